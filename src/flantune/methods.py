"""Fine-tuning methods: decide which weights train, and wrap the model accordingly.

    full      every parameter trains
    lora      PEFT LoRA (optionally DoRA) on the named linear layers
    qlora     LoRA on a base quantized to 4-bit NF4 or 8-bit by bitsandbytes (GPU only)
    ia3       PEFT IA3
    prefix    PEFT prefix tuning
    adapter   bottleneck adapters (flantune.adapters; the AdapterHub library pins transformers 4)

Tokens added by `model.add_tokens` need trainable embedding rows even when the base is frozen:
PEFT's trainable-token adapters train exactly those rows of the input embeddings and of an untied
lm_head.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flantune.config import MethodConfig
from flantune.errors import MethodError  # re-exported: flantune.methods.MethodError
from flantune.models import count_parameters

PEFT_KINDS = ("lora", "qlora", "ia3", "prefix")
FEED_FORWARD_NAMES = {"wi", "wi_0", "wi_1", "wo", "fc1", "fc2", "dense"}


def quantization_config(method: MethodConfig):
    """The bitsandbytes config for QLoRA (transformers 5 takes it as `quantization_config`)."""
    if method.kind != "qlora":
        return None
    if not torch.cuda.is_available():
        raise MethodError(
            "method.kind=qlora: QLoRA quantizes the base with bitsandbytes, which needs a CUDA GPU and none "
            "was found. Use method.kind=lora on this machine."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MethodError("method.kind=qlora needs bitsandbytes: pip install 'flantune[qlora]'") from None
    from transformers import BitsAndBytesConfig

    if method.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _token_indices(model, added_token_ids: list[int]) -> dict[str, list[int]] | None:
    """Which embedding modules need rows for new tokens trained: the input embeddings, and an untied head."""
    if not added_token_ids:
        return None
    indices = {
        "embed_tokens" if _has_stack_embeddings(model) else _input_embedding_name(model): list(
            added_token_ids
        )
    }
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        indices["lm_head"] = list(added_token_ids)
    return indices


def _has_stack_embeddings(model) -> bool:
    """T5 and BART look their tokens up through encoder.embed_tokens / decoder.embed_tokens modules
    that share one weight with the top-level embeddings; those are the modules to wrap."""
    return all(hasattr(getattr(model, part, None), "embed_tokens") for part in ("encoder", "decoder")) or all(
        hasattr(getattr(getattr(model, "model", None), part, None), "embed_tokens")
        for part in ("encoder", "decoder")
    )


def _input_embedding_name(model) -> str:
    embeddings = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embeddings)


def _tie_encoder_decoder_token_rows(peft_model) -> None:
    """Make the encoder's and decoder's trainable token rows one parameter.

    PEFT wraps encoder.embed_tokens and decoder.embed_tokens separately, so the new tokens' rows
    would drift apart although both modules read the same (shared) matrix; merging would then keep
    only one of them. Sharing the parameter keeps them equal in training, in the saved adapter (both
    keys hold the same values, so plain `peft` loads it as is) and in a merge.
    """
    wrappers = [
        m for n, m in peft_model.named_modules() if n.endswith("embed_tokens") and hasattr(m, "token_adapter")
    ]
    if len(wrappers) < 2:
        return
    first = wrappers[0].token_adapter.trainable_tokens_delta
    for wrapper in wrappers[1:]:
        for name in first:
            wrapper.token_adapter.trainable_tokens_delta[name] = first[name]


def _peft_config(model, method: MethodConfig, added_token_ids: list[int]):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType

    token_indices = _token_indices(model, added_token_ids)
    modules_to_save = list(method.modules_to_save) or None
    if method.kind in ("lora", "qlora"):
        return LoraConfig(
            task_type=TaskType.SEQ_2_SEQ_LM,
            r=method.r,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules=method.target_modules,
            use_dora=method.use_dora,
            modules_to_save=modules_to_save,
            trainable_token_indices=token_indices,
        )
    if token_indices:
        raise MethodError(
            f"model.add_tokens with method.kind={method.kind}: new token embeddings cannot train under this method; "
            "use lora, qlora or full"
        )
    if method.kind == "ia3":
        targets = method.target_modules
        feed_forward = None if targets == "all-linear" else [t for t in targets if t in FEED_FORWARD_NAMES]
        return IA3Config(
            task_type=TaskType.SEQ_2_SEQ_LM,
            target_modules=targets,
            feedforward_modules=feed_forward,
            modules_to_save=modules_to_save,
        )
    extra = {}
    if hasattr(model.config, "d_kv"):
        # T5's heads are d_kv wide and need not divide d_model (flan-t5-small: 6 x 64 = 384 < 512);
        # PEFT would otherwise assume d_model / num_heads.
        extra = {
            "token_dim": model.config.num_heads * model.config.d_kv,
            "num_attention_heads": model.config.num_heads,
        }
    return PrefixTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=method.num_virtual_tokens,
        modules_to_save=modules_to_save,
        **extra,
    )


def apply_method(
    model,
    method: MethodConfig,
    *,
    added_token_ids: list[int] = (),
    gradient_checkpointing: bool = False,
    adapter_path: str | None = None,
):
    """Wrap or mark `model` for training with `method`; returns the model to train.

    `adapter_path` continues training an existing adapter (loaded trainable, not frozen).
    """
    added_token_ids = list(added_token_ids)
    if gradient_checkpointing:
        # Non-reentrant checkpointing lets gradients reach adapters even though the frozen
        # embeddings' outputs do not require grad (the classic "does not require grad" failure).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if method.kind == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if method.kind == "full":
        if adapter_path:
            raise MethodError(
                "model.adapter is set but method.kind=full: point model.path at the full model instead"
            )
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method.kind == "adapter":
        return _apply_bottleneck(model, method, added_token_ids, adapter_path)
    if adapter_path:
        return _continue_peft(model, method, adapter_path)
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, _peft_config(model, method, added_token_ids))
    except ValueError as e:
        raise MethodError(f"method.target_modules: {e}") from None
    _tie_encoder_decoder_token_rows(peft_model)
    return peft_model


def _continue_peft(model, method: MethodConfig, adapter_path: str):
    from peft import PeftConfig, PeftModel

    path = Path(adapter_path)
    if not (path / "adapter_config.json").is_file():
        raise MethodError(
            f"model.adapter: {adapter_path} has no adapter_config.json; is it a PEFT adapter folder?"
        )
    saved = PeftConfig.from_pretrained(adapter_path)
    wanted = {"lora": "LORA", "qlora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING"}[method.kind]
    if str(saved.peft_type.value if hasattr(saved.peft_type, "value") else saved.peft_type) != wanted:
        raise MethodError(
            f"model.adapter: {adapter_path} holds a {saved.peft_type} adapter but method.kind={method.kind}"
        )
    try:
        # is_trainable=True: PeftModel.from_pretrained freezes the adapter by default.
        peft_model = PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise MethodError(
            f"model.adapter: {adapter_path} does not fit model.path (made for {saved.base_model_name_or_path!r}?): "
            f"{str(e).splitlines()[0]}"
        ) from None
    _tie_encoder_decoder_token_rows(peft_model)
    return peft_model


def _apply_bottleneck(model, method: MethodConfig, added_token_ids: list[int], adapter_path: str | None):
    from flantune import adapters

    if added_token_ids:
        raise MethodError(
            "model.add_tokens with method.kind=adapter: use lora or full to train new token embeddings"
        )
    if adapter_path:
        try:
            adapters.load_adapters(model, adapter_path)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
            raise MethodError(f"model.adapter: {e}") from None
    else:
        config = adapters.AdapterConfig(placement=method.placement, reduction_factor=method.reduction_factor)
        try:
            adapters.add_adapters(model, config)
        except ValueError as e:
            raise MethodError(f"method.kind=adapter: {e}") from None
    adapters.mark_only_adapters_trainable(model)
    for name in method.modules_to_save:
        module = dict(model.named_modules()).get(name)
        if module is None:
            raise MethodError(f"method.modules_to_save: the model has no module named {name!r}")
        for p in module.parameters():
            p.requires_grad_(True)
    return model


def trainable_line(model) -> str:
    """PEFT's trainable-parameter line, for every method."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
