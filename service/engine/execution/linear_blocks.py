"""Which block shape each weight of the row-invariant linear kernels gets.

A row's output bits depend on the block shape (the order of its sums), so the shape is chosen
from the weight's shape (N, K) alone, never from the number of rows of a pass: a row stays
independent of the other rows (service/engine/execution/invariant_kernels.py, docs/engine.md).
A BlockTable maps (N, K) to block shapes; a weight it does not name gets GEMV_BLOCKS /
TILE_BLOCKS. A JSON file (EngineConfig.linear_blocks, --linear-blocks, SPECDEC_LINEAR_BLOCKS)
overrides DEFAULT_TABLE per weight shape and kernel:

    {"entries": [{"n": 4096, "k": 4096,
                  "tiles": {"bm": 16, "bn": 32, "bk": 128, "warps": 4, "stages": 4, "split": 2},
                  "gemv": {"bn": 8, "bk": 256, "warps": 4}}],
     "evidence": ...}

Either kernel may be left out of an entry, and "split" out of "tiles" (1: no split).
"evidence" (what bench/diagnostics/linear_blocks.py measured to choose the entries) is
ignored here; any other unknown key is an error.

No torch, no Triton: the table is read and checked on any machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class GemvBlocks:
    """_gemv_kernel's block shape: BN outputs per program, BK-wide chunks of the sum."""

    bn: int
    bk: int
    warps: int


@dataclass(frozen=True)
class TileBlocks:
    """_linear_kernel's block shape: BM x BN output tiles, the inner dimension in BK steps.

    split: the inner dimension cut into this many fixed ranges (whole BK steps, the last one
    shorter), each summed by its own programs into a float32 partial, the partials then
    added in range order. It gives a weight with few output tiles (N = 4096 at 32 rows)
    enough programs to fill the GPU; a row's sums still do not depend on M."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    split: int = 1


# Tuned by bench/diagnostics/invariant_tuning.py at SmolLM2-135M's shapes (docs/engine.md): the
# shapes of every weight the table does not name.
GEMV_BLOCKS = GemvBlocks(bn=4, bk=256, warps=4)
TILE_BLOCKS = TileBlocks(bm=16, bn=64, bk=64, warps=4, stages=3)

# Which kernel a pass's linears take: passes of up to the gemv limit run on the CUDA-core gemv
# kernel, larger ones on the tensor-core tile kernel (the two round differently). "auto" (the
# engine's default): the tile kernel for every pass of a model whose hidden size is at least
# TILES_ONLY_FROM_HIDDEN, else the gemv kernel up to GEMV_ROWS_SMALL_MODEL rows (or the widest
# pass, if wider). Measured (bench/RESULTS.md, "The linear kernels at the 8B shape"): at
# hidden 4096 the gemv kernel wins only the 1-row pass (by 11%) and loses up to 6x from 2 rows
# on; at SmolLM2-135M's 576 it takes a batch-1 pass in half the tile kernel's time.
TILES_ONLY_FROM_HIDDEN = 4096
GEMV_ROWS_SMALL_MODEL = 16


def gemv_row_limit(setting: int | None, hidden_size: int, max_width: int) -> int:
    """The gemv limit of a model: `setting` (EngineConfig.gemv_max_rows) when given, else the
    "auto" rule above. max_width: the widest pass at batch 1 (a verify pass, k + 1 tokens),
    which must fall on the decode pass's kernel."""
    if setting is not None:
        return setting
    return 0 if hidden_size >= TILES_ONLY_FROM_HIDDEN else max(GEMV_ROWS_SMALL_MODEL, max_width)


Shape = tuple[int, int]  # a weight's (N, K): N outputs, K inner
Entry = tuple[GemvBlocks | None, TileBlocks | None]
KINDS: Mapping[str, type[GemvBlocks] | type[TileBlocks]] = MappingProxyType(
    {"gemv": GemvBlocks, "tiles": TileBlocks}
)


class BlockTable(Mapping[Shape, Entry]):
    """An immutable mapping (N, K) -> (GemvBlocks or None, TileBlocks or None), and the block
    shapes of the weights it does not name (`gemv`, `tiles`; a tuning run sets other ones)."""

    def __init__(
        self,
        entries: Mapping[Shape, Entry] | None = None,
        *,
        gemv: GemvBlocks = GEMV_BLOCKS,
        tiles: TileBlocks = TILE_BLOCKS,
    ) -> None:
        self._entries = MappingProxyType(dict(entries or {}))
        self._defaults = (gemv, tiles)

    @property
    def gemv(self) -> GemvBlocks:
        """The gemv blocks of a shape the table does not name (or names without gemv)."""
        return self._defaults[0]

    @property
    def tiles(self) -> TileBlocks:
        """The tile blocks of a shape the table does not name (or names without tiles)."""
        return self._defaults[1]

    def __getitem__(self, shape: Shape) -> Entry:
        return self._entries[shape]

    def __iter__(self) -> Iterator[Shape]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BlockTable):
            return dict(self) == dict(other) and self._defaults == other._defaults
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal by contents, as a dict: not hashable

    def __repr__(self) -> str:
        return f"BlockTable({dict(self._entries)!r}, gemv={self.gemv!r}, tiles={self.tiles!r})"

    def for_weight(self, n: int, k: int) -> tuple[GemvBlocks, TileBlocks]:
        """The block shapes of a weight [N, K]: the table's, else its defaults, per kernel."""
        gemv, tiles = self._entries.get((n, k), (None, None))
        return gemv or self.gemv, tiles or self.tiles

    def for_weights(self, shapes: Iterable[Shape]) -> dict[Shape, tuple[GemvBlocks, TileBlocks]]:
        """for_weight of each shape, resolved once (what a forward keeps for its weights)."""
        return {(n, k): self.for_weight(n, k) for n, k in shapes}

    def overridden_by(self, other: BlockTable) -> BlockTable:
        """This table with `other`'s shapes on top, per (N, K) and kernel: an entry of `other`
        that names only tiles keeps this table's gemv for that shape. Defaults: this table's."""
        merged = dict(self._entries)
        for shape, (gemv, tiles) in other.items():
            old_gemv, old_tiles = merged.get(shape, (None, None))
            merged[shape] = (gemv or old_gemv, tiles or old_tiles)
        return BlockTable(merged, gemv=self.gemv, tiles=self.tiles)


# The committed table. Entries come from bench/diagnostics/linear_blocks.py runs (--table-out),
# one per weight shape (N, K) measured; the values are per weight shape, and a shape not listed
# gets GEMV_BLOCKS / TILE_BLOCKS. The sweep, its choice and the passes it speeds up:
# bench/RESULTS.md, "Block shapes of the invariant linear kernel at the 8B shape".
DEFAULT_TABLE = BlockTable(
    {
        # Llama-3.1-8B's fused qkv, o, fused gate/up and down (H100, 2026-12-07; o and down
        # with split inner dimensions from a second sweep the same day, qkv's from a third).
        (6144, 4096): (None, TileBlocks(bm=64, bn=128, bk=128, warps=8, stages=3, split=2)),
        (4096, 4096): (None, TileBlocks(bm=64, bn=64, bk=64, warps=4, stages=4, split=2)),
        (28672, 4096): (None, TileBlocks(bm=64, bn=256, bk=64, warps=8, stages=3)),
        (4096, 14336): (None, TileBlocks(bm=16, bn=256, bk=64, warps=4, stages=3, split=8)),
    }
)


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _blocks(kind: str, raw: Any) -> GemvBlocks | TileBlocks:
    """One kernel's block shape from its JSON object; ValueError says what is wrong."""
    cls = KINDS[kind]
    names = [f.name for f in fields(cls)]
    if not isinstance(raw, dict):
        raise ValueError(f"{kind!r} must be an object with keys {', '.join(names)}")
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"{kind!r} has unknown keys {unknown} (allowed: {', '.join(names)})")
    optional = {f.name for f in fields(cls) if f.default is not MISSING}
    missing = [name for name in names if name not in raw and name not in optional]
    if missing:
        raise ValueError(f"{kind!r} lacks {', '.join(missing)}")
    for name in names:
        if name not in raw:
            continue
        value = raw[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{kind}.{name} must be an integer, not {value!r}")
        if name in ("stages", "split"):
            if value < 1:
                raise ValueError(f"{kind}.{name} must be >= 1, not {value}")
        elif not _is_power_of_two(value):  # Triton's tl.arange and num_warps take powers of two
            raise ValueError(f"{kind}.{name} must be a positive power of two, not {value}")
    if kind == "tiles":
        small = [name for name in ("bm", "bn", "bk") if raw[name] < 16]
        if small:  # tl.dot's smallest operand
            raise ValueError(f"tiles.{small[0]} must be >= 16 (tl.dot), not {raw[small[0]]}")
    return cls(**raw)


def parse_table(data: Any, source: str) -> BlockTable:
    """A BlockTable from the JSON document `data`; ValueError names `source`, the entry's index
    and what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError(f"{source}: want an object with a list 'entries'")
    unknown = sorted(set(data) - {"entries", "evidence"})
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {unknown} (allowed: entries, evidence)")
    entries: dict[Shape, Entry] = {}
    for index, raw in enumerate(data["entries"]):
        where = f"{source}: entry {index}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: must be an object")
        unknown = sorted(set(raw) - {"n", "k", *KINDS})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} (allowed: n, k, gemv, tiles)")
        for name in ("n", "k"):
            value = raw.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {name!r} must be a positive integer, not {value!r}")
        shape = (raw["n"], raw["k"])
        if shape in entries:
            raise ValueError(f"{where}: duplicate weight shape n={shape[0]}, k={shape[1]}")
        if not any(kind in raw for kind in KINDS):
            raise ValueError(f"{where}: names neither 'gemv' nor 'tiles'")
        try:
            gemv = _blocks("gemv", raw["gemv"]) if "gemv" in raw else None
            tiles = _blocks("tiles", raw["tiles"]) if "tiles" in raw else None
        except ValueError as exc:
            raise ValueError(f"{where} (n={shape[0]}, k={shape[1]}): {exc}") from None
        entries[shape] = (gemv, tiles)  # type: ignore[assignment]
    return BlockTable(entries)


def load_table(path: Path) -> BlockTable:
    """The table of a JSON file (format: module docstring); ValueError names the file."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the linear block table: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    return parse_table(data, str(path))


def table_for(path: Path | None) -> BlockTable:
    """The table a process uses: DEFAULT_TABLE, overridden by the file at `path` when given."""
    return DEFAULT_TABLE if path is None else DEFAULT_TABLE.overridden_by(load_table(path))


def table_document(table: BlockTable, evidence: Any = None) -> dict[str, Any]:
    """`table` as the JSON document load_table reads (entries ordered by shape), with
    `evidence` under its own key when given."""
    entries = []
    for (n, k), (gemv, tiles) in sorted(table.items()):
        entry: dict[str, Any] = {"n": n, "k": k}
        if tiles is not None:
            entry["tiles"] = asdict(tiles)
            if tiles.split == 1:  # the default: files stay readable by tables without splits
                del entry["tiles"]["split"]
        if gemv is not None:
            entry["gemv"] = asdict(gemv)
        entries.append(entry)
    document: dict[str, Any] = {"entries": entries}
    if evidence is not None:
        document["evidence"] = evidence
    return document
