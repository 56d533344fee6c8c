"""Per-token provenance on the wire: GenerateChunk.draft_mask (packed bits) and
cut_accepted_drafts, packed by the server and read back by clients (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec.v1 import generation_pb2


def pack_draft_mask(mask: int, tokens: int) -> bytes:
    """`mask` (bit i set: token i is an accepted draft) as ceil(tokens / 8) bytes, least
    significant bit first: little-endian bytes put bit i in byte i // 8, at bit i % 8."""
    if mask < 0 or mask >> tokens:
        raise ValueError(f"draft mask {mask:#x} has bits outside its {tokens} tokens")
    return mask.to_bytes((tokens + 7) // 8, "little")


def unpack_draft_mask(data: bytes, tokens: int) -> list[bool]:
    """Per token, whether it is an accepted draft. Raises ValueError when `data` is not the
    ceil(tokens / 8) bytes GenerateChunk.draft_mask must be, or sets a bit past the tokens."""
    if len(data) != (tokens + 7) // 8:
        raise ValueError(f"draft_mask has {len(data)} bytes for {tokens} tokens, not {(tokens + 7) // 8}")
    mask = int.from_bytes(data, "little")
    if mask >> tokens:
        raise ValueError(f"draft_mask sets bits past its {tokens} tokens")
    return [bool(mask >> i & 1) for i in range(tokens)]


@dataclass
class StreamProvenance:
    """What a stream's chunks say about its tokens, added up chunk by chunk."""

    draft_flags: list[bool] = field(default_factory=list)  # per streamed token
    chunk_sizes: list[int] = field(default_factory=list)  # tokens per chunk (0: a cut-only chunk)
    cut_drafts: int = 0

    def add(self, chunk: generation_pb2.GenerateChunk) -> list[bool]:
        """Adds one chunk; returns its tokens' flags."""
        flags = unpack_draft_mask(chunk.draft_mask, len(chunk.token_ids))
        self.draft_flags.extend(flags)
        self.chunk_sizes.append(len(flags))
        self.cut_drafts += chunk.cut_accepted_drafts
        return flags

    @property
    def streamed_drafts(self) -> int:
        return sum(self.draft_flags)

    @property
    def accepted_drafts(self) -> int:
        """The accepted drafts the stream accounts for: equal to the final metrics'
        accepted_drafts (GenerateChunk.cut_accepted_drafts)."""
        return self.streamed_drafts + self.cut_drafts

    def as_letters(self) -> str:
        """One letter per token, chunks separated by spaces: D an accepted draft, t a token
        of the target's own."""
        out, at = [], 0
        for size in self.chunk_sizes:
            if size:
                out.append("".join("D" if f else "t" for f in self.draft_flags[at : at + size]))
            at += size
        return " ".join(out)
