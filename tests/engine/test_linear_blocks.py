"""Block shapes per weight shape (service/engine/execution/linear_blocks.py): the JSON table, its
checks, its precedence over the committed table, the sweep's choice of entries
(bench/diagnostics/linear_blocks.py) and the setting's way from the flag to the forward.
No GPU, no Triton."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.diagnostics.linear_blocks import (
    GEMV_ROWS,
    NOT_INVARIANT,
    NOT_RUNNABLE,
    TILE_ROWS,
    choose_table,
    table_file,
)
from service.config import ServiceConfig
from service.engine import Engine, EngineConfig
from service.engine.execution.linear_blocks import (
    DEFAULT_TABLE,
    GEMV_BLOCKS,
    TILE_BLOCKS,
    BlockTable,
    GemvBlocks,
    TileBlocks,
    gemv_row_limit,
    load_table,
    table_document,
    table_for,
)
from service.engine.execution.runner import ModelRunner
from service.server import engine_config

REPO = Path(__file__).resolve().parents[2]
TILES = {"bm": 16, "bn": 32, "bk": 128, "warps": 4, "stages": 4}
GEMV = {"bn": 8, "bk": 512, "warps": 8}


def test_the_table_module_needs_neither_torch_nor_triton() -> None:
    """So the table is read and checked on any machine (and by tools without a GPU)."""
    code = (
        "import sys, service.engine.execution.linear_blocks; "
        "heavy = sorted(m for m in ('torch', 'triton') if m in sys.modules); assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def write(tmp_path: Path, document: object, name: str = "blocks.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return path


def test_a_file_names_blocks_per_weight_shape_and_the_rest_falls_back(tmp_path) -> None:
    path = write(
        tmp_path,
        {
            "entries": [
                {"n": 4096, "k": 4096, "tiles": TILES, "gemv": GEMV},
                {"n": 6144, "k": 4096, "tiles": TILES},
                {"n": 4096, "k": 14336, "gemv": GEMV},
            ],
            "evidence": {"anything": ["the loader ignores"]},
        },
    )
    table = load_table(path)
    assert table.for_weight(4096, 4096) == (GemvBlocks(**GEMV), TileBlocks(**TILES))
    assert table.for_weight(6144, 4096) == (GEMV_BLOCKS, TileBlocks(**TILES))
    assert table.for_weight(4096, 14336) == (GemvBlocks(**GEMV), TILE_BLOCKS)
    assert table.for_weight(4096, 1024) == (GEMV_BLOCKS, TILE_BLOCKS)  # not named: the defaults
    assert table[6144, 4096] == (None, TileBlocks(**TILES))
    assert len(table) == 3


def test_the_table_is_immutable() -> None:
    table = BlockTable({(64, 64): (None, TileBlocks(**TILES))})
    with pytest.raises(TypeError):
        table[64, 128] = (None, None)  # type: ignore[index]
    with pytest.raises(TypeError):
        table._entries[64, 128] = (None, None)  # type: ignore[index]
    with pytest.raises(AttributeError):
        table.tiles = TileBlocks(**TILES)  # type: ignore[misc]


def test_a_document_written_by_table_document_loads_back(tmp_path) -> None:
    table = BlockTable(
        {
            (4096, 4096): (GemvBlocks(**GEMV), None),
            (128, 64): (None, TileBlocks(**TILES)),
            (4096, 14336): (None, TileBlocks(**TILES, split=4)),
        }
    )
    document = table_document(table, evidence={"weights": []})
    loaded = load_table(write(tmp_path, document))
    assert dict(loaded) == dict(table)
    splits = {(e["n"], e["k"]): e["tiles"].get("split") for e in document["entries"] if "tiles" in e}
    assert splits == {(128, 64): None, (4096, 14336): 4}  # split 1, the default, is left out


def test_a_tiles_split_is_optional_and_one_when_left_out(tmp_path) -> None:
    table = load_table(
        write(tmp_path, {"entries": [entry(tiles=TILES), entry(k=14336, tiles={**TILES, "split": 8})]})
    )
    assert table.for_weight(4096, 4096)[1].split == 1
    assert table.for_weight(4096, 14336)[1] == TileBlocks(**TILES, split=8)


def entry(**fields) -> dict:
    return {"n": 4096, "k": 4096, **fields}


BAD = [
    (
        {"entries": [entry(tiles={k: v for k, v in TILES.items() if k != "stages"})]},
        "entry 0",
        "lacks stages",
    ),
    ({"entries": [entry(tiles={**TILES, "bn": 48})]}, "entry 0", "tiles.bn must be a positive power of two"),
    ({"entries": [entry(tiles={**TILES, "bk": 0})]}, "entry 0", "tiles.bk must be a positive power of two"),
    (
        {"entries": [entry(gemv={**GEMV, "warps": 3})]},
        "entry 0",
        "gemv.warps must be a positive power of two",
    ),
    ({"entries": [entry(gemv={**GEMV, "bn": -4})]}, "entry 0", "gemv.bn must be a positive power of two"),
    ({"entries": [entry(tiles={**TILES, "stages": 0})]}, "entry 0", "tiles.stages must be >= 1"),
    ({"entries": [entry(tiles={**TILES, "split": 0})]}, "entry 0", "tiles.split must be >= 1"),
    ({"entries": [entry(tiles={**TILES, "split": 2.0})]}, "entry 0", "tiles.split must be an integer"),
    ({"entries": [entry(tiles={**TILES, "bm": 8})]}, "entry 0", "tiles.bm must be >= 16"),
    ({"entries": [entry(tiles={**TILES, "bk": 64.0})]}, "entry 0", "tiles.bk must be an integer"),
    ({"entries": [entry(tiles={**TILES, "num_warps": 4})]}, "entry 0", "unknown keys ['num_warps']"),
    ({"entries": [entry(gemv=GEMV), entry(tiles=TILES)]}, "entry 1", "duplicate weight shape n=4096, k=4096"),
    ({"entries": [entry(tile=TILES)]}, "entry 0", "unknown keys ['tile']"),
    ({"entries": [entry(gemv=GEMV), entry(n=128)]}, "entry 1", "names neither 'gemv' nor 'tiles'"),
    ({"entries": [{"k": 4096, "gemv": GEMV}]}, "entry 0", "'n' must be a positive integer"),
    ({"entries": [entry(n=0, gemv=GEMV)]}, "entry 0", "'n' must be a positive integer"),
    ({"entries": [entry(k="4096", gemv=GEMV)]}, "entry 0", "'k' must be a positive integer"),
    ({"entries": [entry(gemv=[4, 256, 4])]}, "entry 0", "'gemv' must be an object"),
    ({"entries": [7]}, "entry 0", "must be an object"),
    ({"entries": [], "comment": "x"}, "", "unknown top-level keys ['comment']"),
    ({"entry": []}, "", "want an object with a list 'entries'"),
]


@pytest.mark.parametrize(("document", "where", "what"), BAD, ids=[b[2] for b in BAD])
def test_a_bad_file_is_refused_naming_the_file_the_entry_and_the_fault(
    tmp_path, document, where, what
) -> None:
    path = write(tmp_path, document, name="bad-blocks.json")
    with pytest.raises(ValueError) as caught:
        load_table(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {where}"), message
    assert what in message


def test_a_file_that_is_not_json_or_not_there_is_named(tmp_path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{entries: ")
    with pytest.raises(ValueError, match=rf"^{broken}: not JSON"):
        load_table(broken)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'absent.json'}: cannot read"):
        load_table(tmp_path / "absent.json")


def test_a_files_entries_override_the_committed_table_per_shape_and_kernel(tmp_path) -> None:
    committed = BlockTable(
        {
            (4096, 4096): (GemvBlocks(8, 256, 4), TileBlocks(16, 64, 128, 4, 4)),
            (6144, 4096): (GemvBlocks(8, 256, 4), None),
        }
    )
    path = write(tmp_path, {"entries": [entry(tiles=TILES), {"n": 128, "k": 64, "gemv": GEMV}]})
    table = committed.overridden_by(load_table(path))
    assert table.for_weight(4096, 4096) == (GemvBlocks(8, 256, 4), TileBlocks(**TILES))  # gemv kept
    assert table.for_weight(6144, 4096) == (GemvBlocks(8, 256, 4), TILE_BLOCKS)  # untouched
    assert table.for_weight(128, 64) == (GemvBlocks(**GEMV), TILE_BLOCKS)  # added
    assert committed.for_weight(4096, 4096)[1] == TileBlocks(16, 64, 128, 4, 4)  # committed unchanged


def test_the_process_table_is_the_committed_one_unless_a_file_is_given(tmp_path) -> None:
    assert table_for(None) is DEFAULT_TABLE
    table = table_for(write(tmp_path, {"entries": [entry(tiles=TILES)]}))
    assert table.for_weight(4096, 4096)[1] == TileBlocks(**TILES)
    for shape in DEFAULT_TABLE:
        if shape != (4096, 4096):
            assert table[shape] == DEFAULT_TABLE[shape]


def test_a_tables_own_defaults_serve_the_shapes_it_does_not_name() -> None:
    gemv, tiles = GemvBlocks(2, 512, 4), TileBlocks(32, 128, 64, 8, 3)
    table = BlockTable({(64, 64): (GemvBlocks(**GEMV), None)}, gemv=gemv, tiles=tiles)
    assert table.for_weight(64, 64) == (GemvBlocks(**GEMV), tiles)
    assert table.for_weight(128, 64) == (gemv, tiles)
    assert table.overridden_by(BlockTable()).for_weight(1, 1) == (gemv, tiles)
    assert table != BlockTable({(64, 64): (GemvBlocks(**GEMV), None)})  # same entries, other defaults
    assert table == BlockTable({(64, 64): (GemvBlocks(**GEMV), None)}, gemv=gemv, tiles=tiles)


# ---- the sweep's choice ---------------------------------------------------------------------


def sweep_row(n: int, k: int, kind: str, blocks, ms: float, invariant: bool = True, counts=None) -> dict:
    """One row as bench.diagnostics.linear_blocks writes it: `ms` at every row count."""
    counts = counts or (TILE_ROWS if kind == "tiles" else GEMV_ROWS)
    return {
        "shape": "llama8b",
        "linear": f"w{n}x{k}",
        "n": n,
        "k": k,
        "kind": kind,
        "blocks": dataclasses.asdict(blocks),
        "invariant": invariant,
        "ms": {str(m): ms for m in counts},
    }


def test_the_sweep_chooses_the_fastest_invariant_blocks_that_beat_the_current_by_more_than_2_percent(
    tmp_path,
) -> None:
    fast, faster, broken = (
        TileBlocks(16, 32, 128, 4, 4),
        TileBlocks(32, 64, 128, 4, 4),
        TileBlocks(64, 64, 64, 4, 4),
    )
    rows = [
        # o: `fast` is 5% faster and invariant; `faster` is not invariant; `broken` failed.
        sweep_row(4096, 4096, "tiles", TILE_BLOCKS, 0.100),
        sweep_row(4096, 4096, "tiles", fast, 0.095),
        sweep_row(4096, 4096, "tiles", faster, 0.050, invariant=False),
        {**sweep_row(4096, 4096, "tiles", broken, 0.0), "error": "OutOfResources()"},
        # o's gemv: 1% faster only, the current stays.
        sweep_row(4096, 4096, "gemv", GEMV_BLOCKS, 0.100),
        sweep_row(4096, 4096, "gemv", GemvBlocks(8, 256, 4), 0.099),
        # qkv: a candidate measured at fewer row counts looks cheaper but is not comparable.
        sweep_row(6144, 4096, "tiles", TILE_BLOCKS, 0.100),
        sweep_row(6144, 4096, "tiles", fast, 0.090, counts=TILE_ROWS[:2]),
        # down: gemv 10% faster.
        sweep_row(4096, 14336, "gemv", GEMV_BLOCKS, 0.200),
        sweep_row(4096, 14336, "gemv", GemvBlocks(8, 512, 4), 0.180),
    ]
    table, evidence = choose_table(rows, BlockTable())
    assert dict(table) == {
        (4096, 4096): (None, fast),
        (4096, 14336): (GemvBlocks(8, 512, 4), None),
    }
    outcomes = {(e["n"], e["k"], e["kind"]): e["outcome"] for e in evidence}
    assert outcomes == {
        (4096, 4096, "tiles"): "chosen",
        (4096, 4096, "gemv"): "current kept",
        (6144, 4096, "tiles"): "current kept",
        (4096, 14336, "gemv"): "chosen",
    }
    o_tiles = next(e for e in evidence if (e["n"], e["k"], e["kind"]) == (4096, 4096, "tiles"))
    assert o_tiles["current_ms"] == pytest.approx(0.100 * len(TILE_ROWS))
    assert o_tiles["fastest_ms"] == pytest.approx(0.095 * len(TILE_ROWS))
    # What the sweep writes (--table-out) is a table the engine loads.
    document = table_file({"rows": rows, "device": "H100", "command": "sweep"}, BlockTable())
    assert document["evidence"]["weights"] == evidence
    loaded = load_table(write(tmp_path, document))
    assert dict(loaded) == dict(table)


def test_the_sweep_compares_against_the_current_table_not_the_defaults() -> None:
    current = TileBlocks(16, 32, 128, 4, 4)
    rows = [
        sweep_row(4096, 4096, "tiles", TILE_BLOCKS, 0.090),
        sweep_row(4096, 4096, "tiles", current, 0.100),
        sweep_row(4096, 4096, "tiles", TileBlocks(32, 64, 128, 4, 4), 0.099),
    ]
    table, _ = choose_table(rows, BlockTable({(4096, 4096): (None, current)}))
    assert dict(table) == {(4096, 4096): (None, TILE_BLOCKS)}  # 10% faster than the current entry
    table, evidence = choose_table(rows[1:], BlockTable({(4096, 4096): (None, current)}))
    assert len(table) == 0 and evidence[0]["outcome"] == "current kept"  # 1% is not enough
    table, evidence = choose_table(rows[2:], BlockTable({(4096, 4096): (None, current)}))
    assert len(table) == 0 and evidence[0]["outcome"] == "current blocks not measured"


def test_each_row_count_weighs_the_same_in_the_choice() -> None:
    """30% faster at 32 rows (a batch-32 decode pass) and 10% slower at 288 (a wide verify
    pass, several times longer): summed milliseconds would keep the current blocks; the mean
    ratio, 0.95, chooses the candidate."""
    candidate = TileBlocks(32, 64, 128, 4, 4)
    now = {"32": 0.10, "64": 0.12, "128": 0.20, "288": 0.50}
    new = {"32": 0.07, "64": 0.12, "128": 0.20, "288": 0.55}
    rows = [
        {**sweep_row(4096, 4096, "tiles", TILE_BLOCKS, 0.0), "ms": now},
        {**sweep_row(4096, 4096, "tiles", candidate, 0.0), "ms": new},
    ]
    assert sum(new.values()) > sum(now.values())
    table, evidence = choose_table(rows, BlockTable())
    assert table.for_weight(4096, 4096)[1] == candidate
    assert evidence[0]["fastest_relative"] == pytest.approx((0.7 + 1 + 1 + 1.1) / 4)


def test_current_blocks_that_failed_to_run_give_way_to_the_fastest_invariant_candidate() -> None:
    """The engine could not run the weight on its current blocks (say, out of shared memory):
    with no baseline to divide by, the least summed time of the invariant candidates wins."""
    slow, quick = TileBlocks(32, 64, 128, 4, 4), TileBlocks(16, 32, 128, 4, 4)
    rows = [
        {**sweep_row(4096, 4096, "tiles", TILE_BLOCKS, 0.0), "error": "OutOfResources()"},
        sweep_row(4096, 4096, "tiles", slow, 0.120),
        sweep_row(4096, 4096, "tiles", quick, 0.110),
        sweep_row(4096, 4096, "tiles", TileBlocks(64, 64, 64, 4, 4), 0.050, invariant=False),
    ]
    table, evidence = choose_table(rows, BlockTable())
    assert dict(table) == {(4096, 4096): (None, quick)}
    assert evidence[0]["outcome"] == "chosen: the current blocks failed to run"
    table, evidence = choose_table(rows[:1] + rows[3:], BlockTable())
    assert len(table) == 0 and evidence[0]["outcome"] == NOT_RUNNABLE


def test_current_blocks_not_invariant_and_no_invariant_candidate_are_reported() -> None:
    rows = [
        sweep_row(4096, 4096, "tiles", TILE_BLOCKS, 0.100, invariant=False),
        sweep_row(4096, 4096, "tiles", TileBlocks(32, 64, 128, 4, 4), 0.090, invariant=False),
    ]
    table, evidence = choose_table(rows, BlockTable())
    assert len(table) == 0 and evidence[0]["outcome"] == NOT_INVARIANT


def test_current_blocks_that_are_not_invariant_give_way_to_any_invariant_candidate() -> None:
    rows = [
        sweep_row(4096, 4096, "tiles", TILE_BLOCKS, 0.100, invariant=False),
        sweep_row(4096, 4096, "tiles", TileBlocks(32, 64, 128, 4, 4), 0.120),
    ]
    table, evidence = choose_table(rows, BlockTable())
    assert table.for_weight(4096, 4096)[1] == TileBlocks(32, 64, 128, 4, 4)
    assert evidence[0]["current_invariant"] is False


# ---- the setting, from the flag to the forward ----------------------------------------------


def test_the_setting_is_a_flag_over_an_environment_variable_and_reaches_the_engine_config(tmp_path) -> None:
    env = {"SPECDEC_LINEAR_BLOCKS": str(tmp_path / "env.json")}
    assert engine_config(ServiceConfig.from_args([], environ={})).linear_blocks is None
    assert engine_config(ServiceConfig.from_args([], environ=env)).linear_blocks == tmp_path / "env.json"
    flagged = ServiceConfig.from_args(["--linear-blocks", str(tmp_path / "flag.json")], environ=env)
    assert engine_config(flagged).linear_blocks == tmp_path / "flag.json"


def test_the_gemv_limit_is_a_flag_over_an_environment_variable_and_reaches_the_forward(
    target, capsys
) -> None:
    """ "auto" (None: per model) by default; 0 is the tile kernel for every pass; any other value
    must cover a batch-1 verify pass (max_num_draft_tokens + 1 rows), refused by name where it
    does not."""
    assert engine_config(ServiceConfig.from_args([], environ={})).gemv_max_rows is None
    assert engine_config(ServiceConfig.from_args(["--gemv-max-rows", "0"], environ={})).gemv_max_rows == 0
    env = {"SPECDEC_GEMV_MAX_ROWS": "16"}
    assert engine_config(ServiceConfig.from_args([], environ=env)).gemv_max_rows == 16
    assert engine_config(ServiceConfig.from_args(["--gemv-max-rows", "9"], environ=env)).gemv_max_rows == 9
    with pytest.raises(SystemExit):
        ServiceConfig.from_args(["--gemv-max-rows", "8"], environ={})  # k up to 8: 9 rows
    assert "--gemv-max-rows must be 0 or at least --max-num-draft-tokens + 1 = 9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ServiceConfig.from_args(["--gemv-max-rows", "-1"], environ={})
    assert "must be >= 0, not -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ServiceConfig.from_args(["--gemv-max-rows", "AUTO"], environ={})
    assert "must be auto or an integer >= 0, not 'AUTO'" in capsys.readouterr().err
    EngineConfig().validate()
    EngineConfig(gemv_max_rows=0).validate()
    EngineConfig(gemv_max_rows=5, max_num_draft_tokens=4).validate()
    with pytest.raises(ValueError, match="gemv_max_rows must be 0 .* max_num_draft_tokens \\+ 1 = 9"):
        EngineConfig(gemv_max_rows=8).validate()
    assert ModelRunner(target, max_batch=1, max_len=16, gemv_max_rows=16).lean.gemv_max_rows == 16
    assert ModelRunner(target, max_batch=1, max_len=16, gemv_max_rows=0).lean.gemv_max_rows == 0
    hidden = target.model.config.hidden_size  # a small model: auto keeps the gemv kernel
    assert ModelRunner(target, max_batch=1, max_len=16, max_width=20).lean.gemv_max_rows == 20
    assert (
        ModelRunner(target, max_batch=1, max_len=16).lean.gemv_max_rows
        == gemv_row_limit(None, hidden, 1)
        == 16
    )


def test_auto_takes_the_tile_kernel_for_every_pass_of_a_large_model_and_the_gemv_below() -> None:
    assert gemv_row_limit(None, 4096, max_width=9) == 0  # Llama-3.1-8B
    assert gemv_row_limit(None, 576, max_width=9) == 16  # SmolLM2-135M
    assert gemv_row_limit(None, 576, max_width=21) == 21  # a batch-1 verify pass of k = 20
    assert gemv_row_limit(5, 4096, max_width=9) == 5  # a setting wins (EngineConfig checks it)


def test_the_engine_reads_the_file_when_made_and_refuses_a_bad_one(target, tmp_path) -> None:
    path = write(tmp_path, {"entries": [entry(tiles={**TILES, "bn": 48})]})
    with pytest.raises(ValueError, match="tiles.bn must be a positive power of two") as caught:
        Engine(target, EngineConfig(linear_blocks=path))
    assert str(path) in str(caught.value)


def test_the_forward_resolves_each_weights_blocks_from_the_table(target) -> None:
    config = target.model.config
    e, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = e // config.num_attention_heads
    qkv = ((config.num_attention_heads + 2 * config.num_key_value_heads) * d, e)
    table = BlockTable({qkv: (GemvBlocks(**GEMV), TileBlocks(**TILES)), (e, i): (None, TileBlocks(**TILES))})
    runner = ModelRunner(target, max_batch=1, max_len=16, linear_blocks=table)
    assert runner.lean is not None
    assert runner.lean.linear_blocks == {
        qkv: (GemvBlocks(**GEMV), TileBlocks(**TILES)),
        (e, e): (GEMV_BLOCKS, TILE_BLOCKS),  # o
        (2 * i, e): (GEMV_BLOCKS, TILE_BLOCKS),  # gate/up
        (e, i): (GEMV_BLOCKS, TileBlocks(**TILES)),  # down
        (v, e): (GEMV_BLOCKS, TILE_BLOCKS),  # LM head
    }


def test_the_engine_logs_which_table_shapes_its_models_use(target, tmp_path) -> None:
    """A table entry that names no weight of the served models (a typo, or a table swept on
    another vocabulary) changes nothing: the engine says so when it builds its runners."""
    from structlog.testing import capture_logs

    config = target.model.config
    e, i = config.hidden_size, config.intermediate_size
    path = write(tmp_path, {"entries": [entry(n=e, k=i, tiles=TILES), entry(n=12345, k=e, gemv=GEMV)]})
    engine = Engine(target, EngineConfig(linear_blocks=path))
    with capture_logs() as logs:
        engine.start()
        engine.warmup()
        engine.stop(drain_timeout_s=0)
    [line] = [line for line in logs if line["event"] == "linear_blocks"]
    assert (line["used"], line["unused"]) == ([f"{e}x{i}"], [f"12345x{e}"])  # the file's, not the committed
