"""GRPO's log-probability passes on packed rows (rl.packing): a prompt's source once in an encoder
row, its G completions as decoder segments that each read that one source. Compared with the
unpacked path (transformers' forward on padded completions, the encoder states repeated per group):
the same log-probabilities and LoRA gradients in float64, the same RL steps on the CPU, the same
log-probabilities under FlexAttention in bf16 on a GPU."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSeq2SeqLM

from flantune.packing import PAD_PAIR, pack_groups
from flantune.rl import (
    PackedLogprobs,
    _logprobs,
    _packed_chunks,
    completion_mask,
    packed_logprobs,
    run_rl,
    to_grid,
)
from flantune.run import TrainingError

from .conftest import tiny_config
from .test_packing import assert_block_masks_are_create_block_masks
from .test_rl import sort_data, sort_recipe  # noqa: F401 (the RL run's data: a module fixture)
from .test_train import tiny_model_dir

SOURCE_LENGTHS = (5, 150, 17, 9)  # 150: encoder distances past max_distance (128)
G, T, EOS = 3, 12, 1


def lora_policy(t5_small_path, dtype):
    """A tiny FLAN-T5 with LoRA on attention, feed-forward and the head; random LoRA B (PEFT starts
    it at 0) and a visible relative bias, so that every part of the forward moves the result."""
    cfg = tiny_config(t5_small_path)
    cfg.update({"dropout_rate": 0.0, "tie_word_embeddings": False})
    torch.manual_seed(0)
    base = AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation="eager").to(dtype)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "v", "wo", "lm_head"])
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model.eval()


def sampled(vocab: int, pad_id: int = 0, start_id: int = 0):
    """Prompts of uneven lengths and G completions each as `sample_groups` returns them: (b*G, 1+T),
    the start token, then tokens; some end with EOS early and are padded after it, one has no EOS,
    one is EOS alone."""
    g = torch.Generator().manual_seed(1)
    rows = [
        {"input_ids": [*torch.randint(2, vocab, (n - 1,), generator=g).tolist(), EOS]} for n in SOURCE_LENGTHS
    ]
    sequences = torch.full((len(rows) * G, 1 + T), pad_id)
    sequences[:, 0] = start_id
    for j, length in enumerate([4, 12, 1, 7, 3, 9, 12, 2, 5, 6, 11, 8][: len(rows) * G]):
        tokens = torch.randint(2, vocab, (length,), generator=g)
        sequences[j, 1 : 1 + length] = tokens
        if not (j == 1 and length == T):  # completion 1 runs to T without an EOS
            sequences[j, length] = EOS
    enc = {"input_ids": torch.zeros(len(rows), max(SOURCE_LENGTHS), dtype=torch.long)}
    enc["attention_mask"] = torch.zeros_like(enc["input_ids"])
    for i, row in enumerate(rows):
        enc["input_ids"][i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        enc["attention_mask"][i, : len(row["input_ids"])] = 1
    return rows, enc, sequences


def test_pack_groups_layout():
    """Each source once; its completions in the decoder row of the same index, each its own
    segment with positions from 0, shifted right behind the start token, reading that source."""
    sources = [[5, 6, 1], [7, 1], [8, 9, 9, 1]]
    completions = [[11, 1], [12, 13, 1], [14], [15, 1], [1], [16, 17, 18], [19, 1], [20, 1], [21, 22, 1]]
    batch = pack_groups(sources, completions, width=3, pad_id=0, decoder_start_id=0, multiple=8, block=None)
    assert batch["input_ids"].shape == (1, 16) and batch["labels"].shape == (1, 24)
    # First fit decreasing by source + completion tokens: prompt 2 (12), prompt 0 (9), prompt 1 (7).
    assert batch["input_ids"][0, :9].tolist() == [8, 9, 9, 1, 5, 6, 1, 7, 1]
    assert batch["enc_pair"][0, :10].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, PAD_PAIR]
    labels = batch["labels"][0].tolist()
    assert labels[:19] == [19, 1, 20, 1, 21, 22, 1, 11, 1, 12, 13, 1, 14, 15, 1, 1, 16, 17, 18]
    assert batch["decoder_input_ids"][0, :7].tolist() == [0, 19, 0, 20, 0, 21, 22]
    assert batch["dec_pair"][0, :9].tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert batch["dec_src"][0, :19].tolist() == [0] * 7 + [1] * 6 + [2] * 6
    assert batch["dec_pos"][0, :7].tolist() == [0, 1, 0, 1, 0, 1, 2]
    assert set(labels[19:]) == {-100} and set(batch["dec_src"][0, 19:].tolist()) == {PAD_PAIR}
    # token_at / grid_at: completion 0's tokens sit at decoder positions 7, 8 and grid cells 0, 1.
    assert batch["token_at"][:2].tolist() == [7, 8] and batch["grid_at"][:2].tolist() == [0, 1]
    assert batch["labels"].flatten()[batch["token_at"]].tolist() == [t for c in completions for t in c]
    assert batch["grid_at"].tolist() == [j * 3 + t for j, c in enumerate(completions) for t in range(len(c))]
    with pytest.raises(ValueError, match="whole group"):
        pack_groups(sources, completions[:-1], width=3, pad_id=0, decoder_start_id=0)


@pytest.fixture
def float64_throughout(monkeypatch):
    """transformers' T5 (and fast_t5, which mirrors it) take the attention softmax and the layer
    norm's variance in float32 (`.float()`, `.to(torch.float32)`) even in a float64 model: the two
    paths then agree to float32 rounding only (1e-7). Here float64 tensors stay float64, so that
    the comparison reaches float64's (measured: 1e-15)."""
    to_float, to = torch.Tensor.float, torch.Tensor.to

    def keep_float(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else to_float(self, *args, **kwargs)

    def keep_to(self, *args, **kwargs):
        if self.dtype == torch.float64 and (
            args[:1] == (torch.float32,) or kwargs.get("dtype") is torch.float32
        ):
            return self
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", keep_float)
    monkeypatch.setattr(torch.Tensor, "to", keep_to)


@pytest.mark.parametrize("row_tokens", [2048, 60], ids=["one-row", "several-rows"])
def test_packed_logprobs_and_gradients_equal_unpacked_in_float64(
    t5_small_path, row_tokens, float64_throughout
):
    model = lora_policy(t5_small_path, torch.float64)
    rows, enc, sequences = sampled(model.config.vocab_size)
    mask = completion_mask(sequences, EOS)  # (b*G, T)
    keep = mask.bool()
    lora = [p for p in model.parameters() if p.requires_grad]

    unpacked = _logprobs(model, enc, sequences, 0, len(rows), G)  # (b*G, T)
    expected = torch.autograd.grad((unpacked * mask).sum(), lora)
    completions = [sequences[j, 1 : 1 + int(mask[j].sum())].tolist() for j in range(len(sequences))]
    batch = pack_groups([r["input_ids"] for r in rows], completions, width=T, pad_id=0, decoder_start_id=0,
                        row_tokens=row_tokens, multiple=16, block=None)  # fmt: skip
    assert batch["input_ids"].shape[0] == (1 if row_tokens == 2048 else 3)
    packed = to_grid(packed_logprobs(model, batch, "eager"), batch, len(sequences), T)
    scale = float(unpacked[keep].detach().abs().max())
    assert float((packed[keep] - unpacked[keep]).abs().max()) < 1e-9 * scale
    assert torch.all(packed[~keep] == 0)
    got = torch.autograd.grad(packed.sum(), lora)
    for name, a, b in zip(
        [n for n, p in model.named_parameters() if p.requires_grad], got, expected, strict=True
    ):
        assert float((a - b).norm()) <= 1e-8 * float(b.norm()), name
    # rl's own chunking (one batch per chunk of prompts) gives the same numbers.
    (chunked,) = _packed_chunks(rows, sequences, mask, [(0, len(rows))], G, 0, block=False, device="cpu")
    torch.testing.assert_close(to_grid(PackedLogprobs(model, "eager", False)(chunked), chunked, len(sequences), T),
                               packed, rtol=1e-12, atol=1e-12)  # fmt: skip


def test_block_masks_follow_dec_src(t5_small_path):
    """The packer's FlexAttention block masks (blocks of 16, so that segments span blocks and blocks
    hold several segments) visit exactly the blocks where create_block_mask, evaluating the exact
    rule at every score, finds a real token allowed to see a real token: the cross-attention's
    follow dec_src (a completion reads its prompt's source), the decoder's dec_pair."""
    from flantune import fast_t5

    model = AutoModelForSeq2SeqLM.from_config(tiny_config(t5_small_path))
    rows, _, sequences = sampled(model.config.vocab_size)
    mask = completion_mask(sequences, EOS)
    completions = [sequences[j, 1 : 1 + int(mask[j].sum())].tolist() for j in range(len(sequences))]
    batch = pack_groups([r["input_ids"] for r in rows], completions, width=T, pad_id=0, decoder_start_id=0,
                        row_tokens=100, multiple=16, block=16)  # fmt: skip
    assert batch["input_ids"].shape[0] == 2
    assert_block_masks_are_create_block_masks(model, batch, 16)
    # The cross-attention rule itself: a completion's tokens see its own prompt's source only.
    cross = fast_t5.patterns(model, batch, "eager", False)[2].allowed()[:, 0]  # (R, Ld, Le)
    for r in range(batch["dec_src"].shape[0]):
        for q in range(batch["dec_src"].shape[1]):
            src = int(batch["dec_src"][r, q])
            assert torch.equal(cross[r, q], batch["enc_pair"][r] == src)


BF16_TOLERANCE = 2.0
"""The packed FlexAttention path under bf16 autocast may be off the float32 reference by at most
this many times the unpacked path's own bf16 error (plus 0.02 nats): both round activations to bf16,
in different orders."""


@pytest.mark.cuda
def test_flex_packed_logprobs_in_bf16_match_unpacked_on_a_gpu(t5_small_path):
    model = lora_policy(t5_small_path, torch.float32).cuda()
    rows, enc, sequences = sampled(model.config.vocab_size)
    enc, sequences = {k: v.cuda() for k, v in enc.items()}, sequences.cuda()
    mask = completion_mask(sequences, EOS)
    keep = mask.bool()
    (batch,) = _packed_chunks(rows, sequences, mask, [(0, len(rows))], G, 0, block=True, device="cuda")
    module = PackedLogprobs(model, "flex", compile=True)
    with torch.no_grad():
        reference = _logprobs(model, enc, sequences, 0, len(rows), G)  # float32
        with torch.autocast("cuda", dtype=torch.bfloat16):
            unpacked = _logprobs(model, enc, sequences, 0, len(rows), G)
            packed = to_grid(module(batch), batch, len(sequences), T)
    unpacked_error = float((unpacked - reference)[keep].abs().max())
    packed_error = float((packed - reference)[keep].abs().max())
    print(f"bf16 against float32: unpacked {unpacked_error:.3e}, packed flex {packed_error:.3e}")
    assert packed_error <= BF16_TOLERANCE * unpacked_error + 0.02
    assert torch.all(packed[~keep] == 0)


def distinct_words(prompt, completion, row):
    """A reward that tells a random policy's completions apart (the task's own is 0 for them all)."""
    return float(len(set(completion.split())))


def test_packed_rl_steps_equal_unpacked(sort_data, tmp_path):  # noqa: F811
    """rl.packing=true on the CPU (eager attention) takes the same steps as rl.packing=false: the
    same completions (rewards, lengths), loss, KL, clipped share and gradient norm."""
    logs = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        # A fresh policy (output_dir holds no SFT run); micro-batches of 2 prompts x 4 completions.
        recipe = sort_recipe(sort_data, tmp_path / "sft", "rl", max_steps=2, prompts_per_step=4, group_size=4,
                             micro_batch_size=8, lr=1e-5, eval_every=None, save_every=None, packing=packing,
                             rewards=[{"name": f"{__name__}:distinct_words"}])  # fmt: skip
        recipe.rl.output_dir = str(out)
        run_rl(recipe)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        logs[packing] = [r for r in map(json.loads, lines) if "reward" in r]
    assert len(logs[True]) == 2
    for a, b in zip(logs[False], logs[True], strict=True):
        assert (a["reward"], a["reward_std"], a["completion_tokens"]) == (
            b["reward"],
            b["reward_std"],
            b["completion_tokens"],
        )
        for key in ("loss", "kl", "clip_fraction", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    first, second = logs[True]
    assert first["reward_std"] > 0 and first["grad_norm"] > 1e-3  # a real gradient, not noise
    assert second["kl"] > 0  # the policy moved: the second step compares updated weights


def test_rl_packing_true_refuses_what_it_cannot_pack(sort_data, bart_path, tmp_path):  # noqa: F811
    bart = tiny_model_dir(tmp_path / "bart", bart_path)
    recipe = sort_recipe(sort_data, tmp_path / "run", "rl", max_steps=1, packing=True)
    recipe.model.path = str(bart)
    with pytest.raises(
        TrainingError, match=r"rl.packing=true: .*bart is not T5-family.*set rl.packing=false"
    ):
        run_rl(recipe)
    prefix = sort_recipe(sort_data, tmp_path / "run", "rl", {"kind": "prefix"}, max_steps=1, packing=True)
    with pytest.raises(TrainingError, match=r"rl.packing=true: .*method.kind=prefix is not a method it runs"):
        run_rl(prefix)
    assert not (tmp_path / "run" / "rl").exists()  # refused before the run folder is made
