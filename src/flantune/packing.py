"""Pack tokenized (source, target) pairs into shared encoder and decoder rows, padding-free.

A packed micro-batch is a few rows; each row holds several whole pairs: their sources side by side
in the encoder row and their targets side by side, in the same order, in the decoder row. Every
token carries the id of its pair (the same id in both rows) and its position inside its pair, which
is all `flantune.fast_t5` needs to keep each pair's attention to itself and restart T5's relative
positions. A pair is never split across rows; labels of padding are -100, so the loss per target
token is the unpacked one.

    pack_groups        prompts and their G sampled completions each (RL): one encoder pass a prompt
    PackedCollator     a list of tokenized examples -> one packed micro-batch (dict of tensors)
    ShapeBatches       a batch sampler: micro-batches that fill one fixed packed shape (CUDA graphs)
    packed_loader      the training loader of packed micro-batches
    apply_plan         the model set up for the path flantune.speed chose
    PackedLoss         the model as the module a packed step calls (DDP wraps this one)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flantune.fast_t5 import BLOCK, PAD_PAIR, Pattern, block_mask_tensors
from flantune.samplers import EpochBatches, EpochSampler, TokenBudgetBatches

ROW_TOKENS = 2048
"""Encoder tokens per packed row. Any length works; 2048 keeps rows few (one kernel launch covers
many pairs) while the block mask stays small (16 x 16 blocks of 128 per row)."""


COLUMNS = ("input_ids", "enc_pair", "enc_pos", "decoder_input_ids", "dec_pair", "dec_pos", "labels")


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def assign_rows(source_lengths: list[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: indices of pairs per row, each row's sources within row_tokens.

    A source longer than row_tokens gets a row of its own (the row grows; nothing is cut).
    """
    order = sorted(range(len(source_lengths)), key=lambda i: -source_lengths[i])
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        n = source_lengths[i]
        for r in range(len(rows)):
            if fill[r] + n <= row_tokens:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    return rows


class RowFiller:
    """First fit, in arrival order, of pairs into a fixed grid: `rows` rows of `enc_len` source and
    `dec_len` target tokens each. The same order gives the same rows, so the sampler that decides
    which examples make a micro-batch (`ShapeBatches`) and the packer agree on what fits."""

    def __init__(self, rows: int, enc_len: int, dec_len: int):
        self.enc_len, self.dec_len = enc_len, dec_len
        self.rows: list[list[int]] = [[] for _ in range(rows)]
        self.fill = [[0, 0] for _ in range(rows)]  # per row: source tokens, target tokens

    def add(self, index: int, source_len: int, target_len: int) -> bool:
        for row, fill in zip(self.rows, self.fill, strict=True):
            if fill[0] + source_len <= self.enc_len and fill[1] + target_len <= self.dec_len:
                row.append(index)
                fill[0] += source_len
                fill[1] += target_len
                return True
        return False


def pack(
    sources: list[list[int]],
    targets: list[list[int]],
    *,
    pad_id: int,
    decoder_start_id: int,
    row_tokens: int = ROW_TOKENS,
    multiple: int = 128,
    block: int | None = BLOCK,
    shape: tuple[int, int, int] | None = None,
) -> dict:
    """Packed tensors for pairs of token-id lists (targets end with EOS, as tokenized).

    Returns input_ids / enc_pair / enc_pos / attention_mask (R, Le) and decoder_input_ids /
    dec_pair / dec_pos / labels (R, Ld). Lengths are rounded up to `multiple` so that a compiled
    step sees few distinct shapes; padding has pair id PAD_PAIR and label -100. enc_blocks /
    dec_blocks / cross_blocks hold the FlexAttention block-mask indices of the three attentions
    (`fast_t5.block_mask_tensors`, with `block`; none with block=None: the eager path needs
    none), computed here on the CPU so that the training step does not spend GPU launches on them.
    shape: (rows, encoder length, decoder length): pairs go into that grid first fit in the given
    order (`RowFiller`, as `ShapeBatches` chose them) and every batch has that one shape, rows of
    padding alone included: what CUDA-graph capture needs. A pair that does not fit is an error.
    """
    if shape is None:
        rows = assign_rows([len(s) for s in sources], row_tokens)
        enc_len = round_up(max(sum(len(sources[i]) for i in row) for row in rows), multiple)
        dec_len = round_up(max(sum(len(targets[i]) for i in row) for row in rows), multiple)
    else:
        filler = RowFiller(*shape)
        for i, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
            if not filler.add(i, len(src), len(tgt)):
                raise ValueError(
                    f"pair {i} ({len(src)} source, {len(tgt)} target tokens) does not fit the fixed shape "
                    f"{shape} (rows, source length, target length) after the {i} pairs before it: "
                    "fewer pairs per micro-batch (ShapeBatches picks them), or a larger shape"
                )
        rows, (enc_len, dec_len) = filler.rows, shape[1:]
    columns: dict[str, list[list[int]]] = {name: [] for name in COLUMNS}
    for row in rows:
        # Plain lists per row and one tensor per column at the end (writing tensors pair by pair
        # costs several times more CPU per batch).
        col = {name: [] for name in COLUMNS}
        for pair, i in enumerate(row):
            src, tgt = sources[i], targets[i]
            col["input_ids"] += src
            col["enc_pair"] += [pair] * len(src)
            col["enc_pos"] += range(len(src))
            # The decoder input is the target shifted right behind the start token, per pair: the
            # same as the model's own shift of an unpacked target.
            col["decoder_input_ids"] += [decoder_start_id, *tgt[:-1]]
            col["labels"] += tgt
            col["dec_pair"] += [pair] * len(tgt)
            col["dec_pos"] += range(len(tgt))
        e, d = enc_len - len(col["input_ids"]), dec_len - len(col["labels"])
        # Padding counts up too, as one more "pair": the causal rule k_pos <= q_pos then agrees
        # with block order, which the block mask built from pair ids relies on.
        pads = {"input_ids": [pad_id] * e, "enc_pair": [PAD_PAIR] * e, "enc_pos": range(e),
                "decoder_input_ids": [pad_id] * d, "dec_pair": [PAD_PAIR] * d, "dec_pos": range(d),
                "labels": [-100] * d}  # fmt: skip
        for name in COLUMNS:
            columns[name].append(col[name] + list(pads[name]))
    out = {
        name: torch.tensor(values, dtype=torch.int32 if name.endswith(("_pair", "_pos")) else torch.long)
        for name, values in columns.items()
    }
    out["attention_mask"] = (out["enc_pair"] != PAD_PAIR).long()  # counts real source tokens
    if block is None:
        return out
    enc, dec = (out["enc_pair"], out["enc_pos"]), (out["dec_pair"], out["dec_pos"])
    for name, (q, k, causal) in {
        "enc": (enc, enc, False),
        "dec": (dec, dec, True),
        "cross": (dec, enc, False),
    }.items():
        out[f"{name}_blocks"] = block_mask_tensors(Pattern(q[0], k[0], q[1], k[1], causal=causal), block)
    return out


def pack_groups(
    sources: list[list[int]],
    completions: list[list[int]],
    *,
    width: int,
    pad_id: int,
    decoder_start_id: int,
    row_tokens: int = ROW_TOKENS,
    multiple: int = 128,
    block: int | None = BLOCK,
) -> dict:
    """Packed tensors for prompts and their sampled completions (RL), each source encoded once.

    sources: b token-id lists; completions: b*G target-id lists, grouped by prompt (the G of prompt
    0 first), each a completion's tokens up to and including its first EOS (all of them without
    one). A prompt's source is one segment of an encoder row (enc_pair k); its G completions are G
    segments of the decoder row of the same index, each with its own dec_pair (causal self-attention
    within itself) and dec_src k (cross-attention to that one source), laid out prompt by prompt so
    that both ids are non-decreasing along the row (`fast_t5.block_mask_tensors` relies on it).
    Whole groups go into rows first fit decreasing by source + completion tokens (`assign_rows`).

    Besides `pack`'s columns (and dec_src), two (K,) long tensors over the K completion tokens, in
    completion order: token_at, each token's index in the flattened (R * Ld) decoder rows, and
    grid_at, its index in a flattened (b*G, width) grid: where a (b*G, width) result puts it.
    """
    group = len(completions) // max(len(sources), 1)
    if group < 1 or group * len(sources) != len(completions):
        raise ValueError(f"pack_groups: {len(completions)} completions are not a whole group per each of "
                         f"{len(sources)} sources")  # fmt: skip
    if any(not 1 <= len(c) <= width for c in completions):
        raise ValueError(f"pack_groups: every completion needs 1 to width={width} tokens")
    members = [range(p * group, (p + 1) * group) for p in range(len(sources))]
    sizes = [len(src) + sum(len(completions[j]) for j in members[p]) for p, src in enumerate(sources)]
    rows = assign_rows(sizes, row_tokens)
    names = (*COLUMNS, "dec_src")
    built: list[dict[str, list[int]]] = []
    for row in rows:
        col, pair = {name: [] for name in names}, 0
        for k, p in enumerate(row):
            src = sources[p]
            col["input_ids"] += src
            col["enc_pair"] += [k] * len(src)
            col["enc_pos"] += range(len(src))
            for j in members[p]:
                tgt = completions[j]
                col["decoder_input_ids"] += [decoder_start_id, *tgt[:-1]]  # shifted right, per segment
                col["labels"] += tgt
                col["dec_pair"] += [pair] * len(tgt)
                col["dec_src"] += [k] * len(tgt)
                col["dec_pos"] += range(len(tgt))
                pair += 1
        built.append(col)
    enc_len = round_up(max(len(col["input_ids"]) for col in built), multiple)
    dec_len = round_up(max(len(col["labels"]) for col in built), multiple)
    columns: dict[str, list[list[int]]] = {name: [] for name in names}
    token_at: dict[int, list[int]] = {}  # completion -> its tokens' flat decoder indices
    for r, (row, col) in enumerate(zip(rows, built, strict=True)):
        at = r * dec_len
        for p in row:
            for j in members[p]:
                token_at[j] = list(range(at, at + len(completions[j])))
                at += len(completions[j])
        e, d = enc_len - len(col["input_ids"]), dec_len - len(col["labels"])
        pads = {"input_ids": [pad_id] * e, "enc_pair": [PAD_PAIR] * e, "enc_pos": range(e),
                "decoder_input_ids": [pad_id] * d, "dec_pair": [PAD_PAIR] * d, "dec_src": [PAD_PAIR] * d,
                "dec_pos": range(d), "labels": [-100] * d}  # fmt: skip
        for name in names:
            columns[name].append(col[name] + list(pads[name]))
    out = {
        name: torch.tensor(
            values, dtype=torch.int32 if name.endswith(("_pair", "_pos", "_src")) else torch.long
        )
        for name, values in columns.items()
    }
    out["attention_mask"] = (out["enc_pair"] != PAD_PAIR).long()
    out["token_at"] = torch.tensor(
        [i for j in range(len(completions)) for i in token_at[j]], dtype=torch.long
    )
    out["grid_at"] = torch.tensor(
        [j * width + t for j, c in enumerate(completions) for t in range(len(c))], dtype=torch.long
    )
    if block is None:
        return out
    enc = (out["enc_pair"], out["enc_pos"])
    for name, (q_pair, q_pos, k, causal) in {
        "enc": (*enc, enc, False),
        "dec": (out["dec_pair"], out["dec_pos"], (out["dec_pair"], out["dec_pos"]), True),
        "cross": (out["dec_src"], out["dec_pos"], enc, False),
    }.items():
        out[f"{name}_blocks"] = block_mask_tensors(Pattern(q_pair, k[0], q_pos, k[1], causal=causal), block)
    return out


class PackedSources:
    """Padded sources (B, S) laid out packed: each source's real tokens (wherever its mask has
    them, so left or right padding alike) placed first fit decreasing into `rows` rows of `width`
    tokens, one pair per source. Planned on the host (one copy of the mask to the CPU); the device
    gets the ids, pair ids, positions and the encoder's block-mask tensors.

    `src` (N,) indexes the N real tokens in the flattened (B*S) input, `dst` (N,) the same tokens
    in the flattened packed (rows*width) layout: `unpack` scatters an output back to (B, S, ...).
    """

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, *, width: int = 512, block: int | None = BLOCK,
                 first_fit: bool = True):  # fmt: skip
        import numpy as np

        batch, length = input_ids.shape
        device = input_ids.device
        mask = attention_mask.detach().to("cpu", torch.bool).numpy()  # (B, S); sync: planned on the host
        rows_of, cols = np.nonzero(mask)  # row-major: each source's tokens in order
        lengths = mask.sum(1)  # (B,)
        self.width = max(width, round_up(int(lengths.max(initial=1)), BLOCK))
        # first_fit False: each source in a row of its own (the padded layout, for comparisons)
        groups = assign_rows(lengths.tolist(), self.width) if first_fit else [[i] for i in range(batch)]
        self.rows = len(groups)
        row = np.zeros(batch, dtype=np.int64)  # packed row and start of every source
        start = np.zeros(batch, dtype=np.int64)
        pair = np.full((self.rows, self.width), PAD_PAIR, dtype=np.int64)
        pos = np.zeros((self.rows, self.width), dtype=np.int64)
        for r, members in enumerate(groups):
            at = 0
            for j, i in enumerate(members):  # pair ids 0, 1, ... in row order (block_mask_tensors)
                n = int(lengths[i])
                row[i], start[i] = r, at
                pair[r, at:at + n] = j
                pos[r, at:at + n] = np.arange(n)
                at += n
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # index of each source's first token in rows_of
        offset = np.arange(len(rows_of)) - first[rows_of]  # position of every real token in its source
        src = rows_of * length + cols
        dst = row[rows_of] * self.width + start[rows_of] + offset
        self.src = torch.from_numpy(src).to(device)
        self.dst = torch.from_numpy(dst).to(device)
        pair_t, pos_t = torch.from_numpy(pair), torch.from_numpy(pos)
        self.blocks = None
        if block is not None:  # on the CPU, as packing does, then copied: no per-layer work on the GPU
            cpu = Pattern(pair_t, pair_t, pos_t, pos_t, causal=False)
            self.blocks = tuple(t.to(device) for t in block_mask_tensors(cpu, block))
        self.pair, self.pos = pair_t.to(device), pos_t.to(device)
        self.ids = torch.zeros(self.rows * self.width, dtype=input_ids.dtype, device=device)
        self.ids[self.dst] = input_ids.reshape(-1)[self.src]
        self.ids = self.ids.view(self.rows, self.width)  # (R, W); padding id 0, pair PAD_PAIR
        self.shape = (batch, length)

    def unpack(self, packed: Tensor) -> Tensor:
        """(R, W, ...) -> (B, S, ...): every real token's row back in its source's place, zeros at
        padding (which no query of the decoder attends)."""
        batch, length = self.shape
        flat = packed.reshape(self.rows * self.width, *packed.shape[2:])
        out = flat.new_zeros(batch * length, *packed.shape[2:])
        out[self.src] = flat[self.dst]
        return out.view(batch, length, *packed.shape[2:])


def to_device(batch: dict, device) -> dict:
    """A packed batch on `device` (the block-mask entries are tuples of tensors)."""
    return {
        k: tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device) for k, v in batch.items()
    }


class PackedBatch(dict):
    """A packed micro-batch from the loader: column name -> tensor (block masks: a tuple of them).

    Pickled by value. A loader worker hands a batch to the training process through a pipe; plain
    tensors would each go through shared memory, one file-descriptor round trip to the worker per
    tensor, and a packed micro-batch has 32 of them (about 100 KB in all). Measured in the main
    thread with the workers ahead (bench/loader_handoff.py, one SciQ micro-batch, 2 cores): 20.1 ms
    per micro-batch as shared-memory tensors, 2.7 ms by value. Integer columns only (numpy has no
    bfloat16).
    """

    def __reduce__(self):
        # force: a batch already on the GPU (never sent to a worker) still pickles.
        arrays = {k: tuple(t.numpy(force=True) for t in v) if isinstance(v, tuple) else v.numpy(force=True)
                  for k, v in self.items()}  # fmt: skip
        return _packed_batch, (arrays,)

    def __copy__(self):  # what the DataLoader's pinning thread does with a mapping: a shallow copy
        return PackedBatch(self)


def _packed_batch(arrays: dict) -> PackedBatch:
    return PackedBatch(
        {
            k: tuple(map(torch.from_numpy, v)) if isinstance(v, tuple) else torch.from_numpy(v)
            for k, v in arrays.items()
        }
    )


class PackedCollator:
    """DataLoader collate_fn: tokenized rows ({input_ids, labels, ...}) -> a packed micro-batch."""

    def __init__(
        self, pad_id: int, decoder_start_id: int, row_tokens: int = ROW_TOKENS, block_masks: bool = True,
        shape: tuple[int, int, int] | None = None,
    ):  # fmt: skip
        self.pad_id, self.decoder_start_id, self.row_tokens = pad_id, decoder_start_id, row_tokens
        self.block = BLOCK if block_masks else None
        self.shape = shape

    def __call__(self, examples: list[dict]) -> PackedBatch:
        batch = pack(
            [list(x["input_ids"]) for x in examples],
            [[t for t in x["labels"] if t != -100] for x in examples],
            pad_id=self.pad_id,
            decoder_start_id=self.decoder_start_id,
            row_tokens=self.row_tokens,
            block=self.block,
            shape=self.shape,
        )
        return PackedBatch(batch)


class ShapeBatches(EpochBatches):
    """Micro-batches that fill one fixed packed shape (rows, source length, target length).

    Examples come in the epoch's order; each goes into the first row with room for both its
    source and its target (`RowFiller`), and the micro-batch closes at the first example that fits
    nowhere. The packer, given the same examples in the same order, makes the same rows. For
    CUDA-graph training, where every micro-batch must have one shape.
    """

    def __init__(self, source_lengths: list[int], target_lengths: list[int], shape: tuple[int, int, int],
                 seed: int):  # fmt: skip
        super().__init__(len(source_lengths), seed)
        self.sources, self.targets, self.shape = source_lengths, target_lengths, shape
        for i, (s, t) in enumerate(zip(source_lengths, target_lengths, strict=True)):
            if s > shape[1] or t > shape[2]:
                raise ValueError(
                    f"training row {i} has {s} source and {t} target tokens, more than one packed row "
                    f"holds ({shape[1]} and {shape[2]}): lower data.max_source_tokens / max_target_tokens"
                )

    def _make(self, order: list[int], g: torch.Generator) -> list[list[int]]:
        out, filler, current = [], RowFiller(*self.shape), []
        for i in order:
            if not filler.add(len(current), self.sources[i], self.targets[i]):
                out.append(current)
                filler, current = RowFiller(*self.shape), []
                filler.add(0, self.sources[i], self.targets[i])
            current.append(i)
        if current:
            out.append(current)
        return out


def packed_shape(source_lengths: list[int], target_lengths: list[int], token_budget: int,
                 multiple: int = 128, row_tokens: int | None = None) -> tuple[int, int, int]:  # fmt: skip
    """One packed shape for a data set: (rows, source length, target length) holding about
    `token_budget` source + target tokens per micro-batch.

    One row holds the budget's source share (row_tokens=None), or rows are `row_tokens` source
    tokens long where that is less (longer where a source is). One row is the default: the block
    mask skips the other pairs at no cost, and first-fit into one long row leaves the least room
    unused (real share of the micro-batch on SciQ lengths 93.6% against 93.0% with 2048-token
    rows, on summarization lengths 93.1% against 87.0%: bench/pack_share.py). The target length
    follows the data's target-to-source ratio with 25% room, so that rows close on the source side
    rather than leaving source room unused; every row holds the longest source and target alone.
    """
    sources, targets = sum(source_lengths), sum(target_lengths)
    source_budget = token_budget * sources / (sources + targets)
    row = math.ceil(source_budget) if row_tokens is None else min(row_tokens, math.ceil(source_budget))
    enc_len = round_up(max(row, max(source_lengths)), multiple)
    rows = max(1, round(source_budget / enc_len))
    dec_len = round_up(max(max(target_lengths), math.ceil(1.25 * enc_len * targets / sources)), multiple)
    return rows, enc_len, dec_len


# ----------------------------------------------------------------------------------------------
# The training engine's hooks


def packed_loader(dataset, *, batch_size: int, token_budget: int | None, seed: int, pad_id: int,
                  decoder_start_id: int, block_masks: bool = True, fixed_shape: bool = False,
                  pin_memory: bool = False):  # fmt: skip
    """(DataLoader of packed micro-batches, its sampler with set_epoch, the fixed shape or None).

    Without a token budget a micro-batch holds batch_size examples in the unpacked order (the same
    examples as the unpacked run, so the two compare step for step). block_masks: make the
    FlexAttention block masks while packing (the flex path; the eager path needs none).
    fixed_shape: every micro-batch fills one shape (`packed_shape` of the token budget, which
    defaults to batch_size examples of the data's mean length; `ShapeBatches`), for CUDA graphs.
    pin_memory: page-locked micro-batches (CUDA), for asynchronous copies to the GPU.
    """
    from torch.utils.data import DataLoader

    shape = None
    if fixed_shape or token_budget is not None:
        sources = [len(s) for s in dataset["input_ids"]]
        targets = [sum(1 for t in labels if t != -100) for labels in dataset["labels"]]
    if fixed_shape:
        budget = token_budget or round(batch_size * (sum(sources) + sum(targets)) / max(len(sources), 1))
        shape = packed_shape(sources, targets, budget)
    collator = PackedCollator(pad_id, decoder_start_id, block_masks=block_masks, shape=shape)
    generator = torch.Generator().manual_seed(seed)
    # Packing and the block masks take a few ms of CPU per micro-batch: on CUDA, two worker processes
    # build the next batches while the GPU runs this one (on the CPU they would compete for cores).
    workers = 2 if torch.cuda.is_available() else 0
    extra = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": pin_memory}
    if shape is None and token_budget is None:
        sampler = EpochSampler(len(dataset), seed)
        loader = DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator, generator=generator, **extra
        )
        return loader, sampler, None
    if shape is None:
        sampler = TokenBudgetBatches(
            [s + t for s, t in zip(sources, targets, strict=True)], token_budget, seed
        )
    else:
        sampler = ShapeBatches(sources, targets, shape, seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, generator=generator, **extra)
    return loader, sampler, shape


def apply_plan(plan, base, model) -> None:
    """Set the model up for the path a `flantune.speed.SpeedPlan` chose.

    Unpacked runs keep transformers' forward; an explicit train.attention (eager/sdpa) picks its
    backend. Packed flex runs freeze T5's relative bias tables (see flantune.fast_t5: their gradient
    through FlexAttention is 29x slower; they are 2 x 32 x heads pretrained numbers).
    """
    from flantune import fast_t5

    if not plan.packing and plan.attention != "auto":
        base.set_attn_implementation(plan.attention)
    if plan.packing and plan.attention == "flex":
        fast_t5.freeze_relative_bias(model)


class PackedModule(torch.nn.Module):
    """The model as a module whose forward runs the packed path (subclasses say what it returns:
    PackedLoss here, flantune.rl.PackedLogprobs).

    The packed path calls the model's submodules itself (flantune.fast_t5). DDP arms its gradient
    all-reduce in its own forward, so the module it wraps must be this one: were the model wrapped
    and its submodules called directly, backward would run without synchronizing gradients.
    Accelerate's autocast around forward applies here too.
    """

    def __init__(self, model, attention: str, compile: bool, compile_options: dict | None = None):
        """compile: compile the T5 block (`torch.compile` with `compile_options`, e.g. a mode)."""
        super().__init__()
        from flantune import fast_t5

        self.model, self.attention, self.block_fn = model, attention, None
        # Accelerate reads these to leave a quantized or device-mapped model where it was loaded.
        for name in ("hf_device_map", "is_loaded_in_4bit", "is_loaded_in_8bit"):
            if getattr(model, name, None) is not None:
                setattr(self, name, getattr(model, name))
        if compile:
            # One graph per block kind (encoder, decoder); a few shapes (packed lengths are rounded
            # to 128), then dynamic: allow recompiles.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.block_fn = torch.compile(fast_t5.t5_block, **(compile_options or {}))


class PackedLoss(PackedModule):
    """The model as a module whose forward is the summed target-token loss of a packed micro-batch."""

    def forward(self, batch: dict, labels: torch.Tensor) -> torch.Tensor:
        from flantune import fast_t5

        return fast_t5.packed_loss_sum(
            self.model, {**batch, "labels": labels}, self.attention, block_fn=self.block_fn
        )

    def fixed_shape_loss(self, batch: dict) -> torch.Tensor:
        """The summed loss of a fixed-shape micro-batch (labels included) without a host sync:
        what `flantune.graphs.CapturedStep` records."""
        from flantune import fast_t5

        return fast_t5.packed_loss_sum(
            self.model, batch, self.attention, block_fn=self.block_fn, select_targets=False
        )
