"""Batched decoding on a shared KV cache with token-prefix reuse.

A :class:`SlotBatch` holds R rows of token sequences in one physical KV cache.  Each row has a
*logical* sequence (the tokens the model has seen, with positions 0..n-1) mapped to *physical* cache
slots.  Appending a segment left-pads it so every row's newest token sits in the last column; padded
slots are masked out of attention forever.  Dropping a row's tail (to reuse only the longest common
token prefix with a new prompt) masks those slots instead of copying the cache, so any template order
is correct and the shared image + question prefix is encoded once.

Because a masked slot contributes exactly zero attention weight and positions are explicit, a row's
states equal those of the same tokens run alone, up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from sdrt_cli.backbone import Backbone, EncodedImages


@contextlib.contextmanager
def capture_layer_outputs(layers: Sequence[torch.nn.Module], store: dict[int, torch.Tensor], indices: Sequence[int]) -> Iterator[None]:
    """Record the outputs of ``layers[i]`` for i in ``indices`` into ``store`` on every forward: a
    forward hook on the module, keeping its output (or the output's first element, for layers that
    return a tuple).  This is how traces capture states; see docs/backbones.md."""
    handles = []
    for index in indices:

        def hook(_module, _inputs, output, _index=index):
            store[_index] = output[0] if isinstance(output, tuple) else output

        handles.append(layers[index].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class SegmentOutput:
    last_hidden: torch.Tensor  # final-normed, [R, L, H]; row r's newest token is at column -1
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # decoder-layer outputs [R, L, H]


class SlotBatch:
    """Rows of token sequences sharing one physical KV cache (see module docstring)."""

    def __init__(self, backbone: Backbone, rows: int):
        self.backbone = backbone
        self.cache = backbone.new_cache()
        self.mask = torch.zeros(rows, 0, dtype=torch.long, device=backbone.device)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.slots: list[list[int]] = [[] for _ in range(rows)]
        # per row: the image features of its example, in image-token order
        self.image_features: list[torch.Tensor | None] = [None] * rows
        self.fed_tokens = 0  # real tokens run through the language model (benchmarks report it)

    @property
    def rows(self) -> int:
        return len(self.tokens)

    def select_rows(self, index: Sequence[int]) -> None:
        """Keep rows ``index`` in that order (repeating a row duplicates it: one prefix, many prompts)."""
        idx = torch.tensor(list(index), dtype=torch.long, device=self.backbone.device)
        if self.mask.shape[1] > 0:
            self.cache.reorder_cache(idx)
        self.mask = self.mask.index_select(0, idx)
        self.tokens = [list(self.tokens[i]) for i in index]
        self.slots = [list(self.slots[i]) for i in index]
        self.image_features = [self.image_features[i] for i in index]

    def truncate(self, row: int, length: int) -> None:
        """Forget row ``row``'s tokens from logical position ``length`` on."""
        dropped = self.slots[row][length:]
        if dropped:
            self.mask[row, dropped] = 0
            del self.slots[row][length:]
            del self.tokens[row][length:]

    def set_images(self, row: int, encoded: EncodedImages) -> None:
        self.image_features[row] = torch.cat(encoded.features, dim=0) if encoded.features else None

    def _segment_image_features(self, row: int, segment: Sequence[int]) -> torch.Tensor | None:
        """The rows of this row's image features that belong to the image tokens of ``segment``."""
        image_id = self.backbone.image_token_id
        count = sum(1 for t in segment if t == image_id)
        if count == 0:
            return None
        before = sum(1 for t in self.tokens[row] if t == image_id)
        feats = self.image_features[row]
        if feats is None or before + count > feats.shape[0]:
            raise ValueError(f"row {row}: the prompt has more image tokens than its images have features")
        return feats[before : before + count]

    def append(self, segments: Sequence[Sequence[int]], capture: Sequence[int] = ()) -> SegmentOutput:
        """Feed one segment per row (empty = nothing for that row) through the language model."""
        backbone = self.backbone
        device = backbone.device
        width = max(1, max(len(s) for s in segments))
        ids = torch.full((self.rows, width), backbone.pad_token_id, dtype=torch.long)
        seg_mask = torch.zeros(self.rows, width, dtype=torch.long)
        positions = torch.zeros(self.rows, width, dtype=torch.long)
        start = self.mask.shape[1]
        features: list[torch.Tensor | None] = []
        for r, seg in enumerate(segments):
            n = len(seg)
            features.append(self._segment_image_features(r, seg) if n else None)
            self.fed_tokens += n
            here = len(self.tokens[r])
            positions[r, :] = here  # padded columns: any in-range position, they are masked
            if n:
                ids[r, width - n :] = torch.tensor(list(seg), dtype=torch.long)
                seg_mask[r, width - n :] = 1
                positions[r, width - n :] = torch.arange(here, here + n)
                self.tokens[r].extend(seg)
                self.slots[r].extend(range(start + width - n, start + width))
        ids = ids.to(device)
        attention = torch.cat([self.mask, seg_mask.to(device)], dim=1)
        embeds = backbone.embed(ids, features)
        captured: dict[int, torch.Tensor] = {}
        with capture_layer_outputs(backbone.decoder_layers, captured, capture):
            out = backbone.lm_forward(embeds, attention, positions.to(device), self.cache)
        self.cache = out.past_key_values
        self.mask = attention
        return SegmentOutput(last_hidden=out.last_hidden, layers=captured)


@dataclass
class Sampling:
    """Greedy when ``temperature`` is 0; otherwise temperature + nucleus sampling with per-row seeds."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


def row_generator(seed: int, *keys: object) -> torch.Generator:
    """A generator seeded by the row's identity, so samples do not depend on batching or rank."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def pick_next(logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of each row: argmax, or a draw from the temperature- and nucleus-shaped
    distribution by inverting its cumulative sum at one uniform number per row.  A row without a
    generator decodes greedily (the trace engine's plain-student rows beside sampled teacher rows)."""
    if sampling.temperature <= 0 or all(g is None for g in generators):
        return logits.argmax(dim=-1).tolist()
    if any(g is None for g in generators):
        picks = logits.argmax(dim=-1).tolist()
        sampled = [i for i, g in enumerate(generators) if g is not None]
        index = torch.tensor(sampled, device=logits.device)
        for i, token in zip(sampled, pick_next(logits.index_select(0, index), sampling, [generators[i] for i in sampled])):
            picks[i] = token
        return picks
    # the uniforms come from the rows' own (CPU) generators, so a row's draw does not depend on
    # batching or rank; the distribution stays on the logits' device and only R indices come back
    uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(logits.device)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    if sampling.top_p < 1.0:
        sorted_probs = sorted_probs * (sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p)
    cdf = sorted_probs.double().cumsum(-1)
    # the first token whose cumulative mass exceeds u * total (a cut token adds no mass: never picked)
    picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[-1] - 1)
    return order.gather(-1, picks).squeeze(-1).tolist()


StepHook = Callable[[int, list[int], SegmentOutput, torch.Tensor], None]


def decode(
    batch: SlotBatch,
    first_logits: torch.Tensor,
    rows: Sequence[int],
    max_new_tokens: int,
    sampling: Sampling,
    generators: Sequence[torch.Generator | None],
    capture: Sequence[int] = (),
    on_step: StepHook | None = None,
) -> dict[int, list[int]]:
    """Generate for ``rows`` of ``batch`` from logits at their last position.

    Returns the generated ids per row (ending in EOS when one was produced).  The last generated
    token of each row is never fed, so the cache holds the prompt plus all but the last token; each
    step that does feed tokens calls ``on_step(step, fed_rows, output, logits)`` where row r's state
    at column -1 is the state AT the fed token, which predicts the next one.
    """
    eos = set(batch.backbone.eos_token_ids)
    generated: dict[int, list[int]] = {r: [] for r in rows}
    active = list(rows)
    logits = first_logits  # [len(rows) ordered as `rows`, V]
    row_pos = {r: i for i, r in enumerate(rows)}
    for step in range(max_new_tokens):
        picks = pick_next(logits, sampling, [generators[row_pos[r]] for r in active])
        still = []
        for r, token in zip(active, picks):
            generated[r].append(token)
            if token not in eos and len(generated[r]) < max_new_tokens:
                still.append(r)
        if not still:
            break
        segments = [[generated[r][-1]] if r in still else [] for r in range(batch.rows)]
        out = batch.append(segments, capture=capture)
        with torch.no_grad():
            step_logits = batch.backbone.lm_logits(out.last_hidden[:, -1])
        if on_step is not None:
            on_step(step, still, out, step_logits)
        index = torch.tensor(still, device=step_logits.device)
        logits = step_logits.index_select(0, index)
        active = still
    return generated


# Examples generated together when --batch-size is not given: (on a CPU, on a GPU).  The GPU numbers
# fill a 40-80 GB card with LLaVA-1.6 7B at ~3k-token prompts (its KV cache is 128 KiB per token and
# row): eval's 32 rows take ~13 GiB, traces' 4 examples x 8 prompts ~14 GiB, beside 15 GB of weights.
GENERATION_BATCH = {"traces": (2, 4), "eval": (4, 32)}


def generation_batch_size(command: str, requested: int | None, device: str | None) -> int:
    """``requested``, or the command's default (``GENERATION_BATCH``) for the device the run will use."""
    if requested is not None:
        return requested
    on_cpu, on_gpu = GENERATION_BATCH[command]
    if device in (None, "auto"):
        return on_gpu if torch.cuda.is_available() else on_cpu
    try:
        kind = torch.device(device).type
    except RuntimeError:  # a bad --device is refused, in one sentence, where the backbone loads
        kind = "cpu"
    return on_gpu if kind == "cuda" else on_cpu
