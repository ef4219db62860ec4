"""Import (and export) checkpoints in the reference's key layout (Neur-IO/SFTok, TiTok family).

Official SFTok key -> ours (everything else is identical):
    latent_tokens                    -> encoder.latent_tokens
    encoder.conv_out.{weight,bias}   -> encoder.proj_out.*   (1×1 conv C×W×1×1 -> Linear C×W)
    decoder.ffn.0.* / decoder.ffn.2.* -> decoder.head.0.* / decoder.head.2.*  (1×1 convs -> Linear)
    quantize.embedding (1×Q×C)       -> quantize.embedding (Q×C)   (one group)
    quantize.index_offset            -> quantize.index_offset (group offsets; one group: must be [0])
The teacher (`maskgit-vqgan-imagenet-f16-256.bin`) needs no mapping: `MaskGitVQGAN` uses the
official keys (see `sftok.teacher.load_teacher_weights`).

Imported models get `encoder.legacy_reshape=True` (golden README item 2) and the requested
`quantizer.assign_at_inference` ("sinkhorn" reproduces the reference, item 3).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from sftok.config import (
    DecoderConfig,
    EncoderConfig,
    QuantizerConfig,
    TeacherConfig,
    TokenizerConfig,
)
from sftok.teacher import check_state_dict, infer_teacher_config, read_state_dict
from sftok.tokenizer import SFTok

# Official keys whose value we cannot represent otherwise: one codebook group only.
_CHECKED_VALUES: dict[str, Callable[[Tensor], bool]] = {
    "quantize.index_offset": lambda t: t.numel() == 1 and int(t.reshape(-1)[0]) == 0,
}


def _to_linear(t: Tensor) -> Tensor:  # o×i×1×1 conv weight -> o×i linear weight
    return t.reshape(t.shape[0], t.shape[1])


def _to_conv1x1(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], t.shape[1], 1, 1)


_ident = lambda t: t

# (official regex, our template, official -> ours, ours -> official)
_RULES: list[tuple[re.Pattern, str, Callable, Callable]] = [
    (re.compile(r"^latent_tokens$"), "encoder.latent_tokens", _ident, _ident),
    (re.compile(r"^encoder\.conv_out\.weight$"), "encoder.proj_out.weight", _to_linear, _to_conv1x1),
    (re.compile(r"^encoder\.conv_out\.bias$"), "encoder.proj_out.bias", _ident, _ident),
    (re.compile(r"^decoder\.ffn\.([02])\.weight$"), r"decoder.head.\1.weight", _to_linear,
     _to_conv1x1),
    (re.compile(r"^decoder\.ffn\.([02])\.bias$"), r"decoder.head.\1.bias", _ident, _ident),
    (re.compile(r"^quantize\.embedding$"), "quantize.embedding", lambda t: t.reshape(t.shape[-2:]),
     lambda t: t[None]),
]
_INVERSE: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^encoder\.latent_tokens$"), "latent_tokens"),
    (re.compile(r"^encoder\.proj_out\.(weight|bias)$"), r"encoder.conv_out.\1"),
    (re.compile(r"^decoder\.head\.([02])\.(weight|bias)$"), r"decoder.ffn.\1.\2"),
]


def map_official_key(key: str) -> str | None:
    """Official SFTok key -> our key."""
    for pat, tmpl, _, _ in _RULES:
        if pat.match(key):
            return pat.sub(tmpl, key)
    return key


def convert_official_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official SFTok state dict -> ours (renames + 1×1-conv / group reshapes)."""
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        check = _CHECKED_VALUES.get(key)
        if check is not None and not t.is_meta and not check(t):
            raise ValueError(f"official key {key} holds {t.tolist()}; only one quantizer group "
                             "(offset [0]) is supported")
        for pat, tmpl, fwd, _ in _RULES:
            if pat.match(key):
                key, t = pat.sub(tmpl, key), fwd(t)
                break
        if key in out:
            raise ValueError(f"two official keys map to {key}")
        out[key] = t
    return out


def export_official_state_dict(model: SFTok) -> dict[str, Tensor]:
    """Our SFTok -> a state dict in the official layout (inverse of the import)."""
    out: dict[str, Tensor] = {}
    for key, t in model.state_dict().items():
        t = t.detach()
        if key == "quantize.embedding" and t.ndim == 2:
            out[key] = t[None].clone()
            continue
        for pat, tmpl in _INVERSE:
            if pat.match(key):
                key = pat.sub(tmpl, key)
                if t.ndim == 2 and key.endswith(".weight") and ("conv_out" in key or "ffn" in key):
                    t = _to_conv1x1(t)
                break
        out[key] = t.clone()
    return out


def infer_tokenizer_config(sd: dict[str, Tensor]) -> tuple[TokenizerConfig, int, int,
                                                            TeacherConfig | None]:
    """(TokenizerConfig, num_codes V, grid, pixel-decoder TeacherConfig | None) from official keys.

    Heads are not observable from shapes; the reference's ViT sizes all use 64-dim heads
    (small 512/8, base 768/12, large 1024/16), so heads = width // 64 (at least 1).
    """
    def depth(prefix: str) -> int:
        return len({k.split(".")[2] for k in sd if k.startswith(prefix + ".transformer.")})

    def mlp_ratio(prefix: str) -> float:
        h, w = sd[f"{prefix}.transformer.0.mlp.c_fc.weight"].shape
        return h / w

    enc_w = sd["encoder.class_embedding"].shape[-1]
    dec_w = sd["decoder.class_embedding"].shape[-1]
    patch = sd["encoder.patch_embed.weight"].shape[-1]
    enc_grid = math.isqrt(sd["encoder.positional_embedding"].shape[0] - 1)
    grid = math.isqrt(sd["decoder.learnable_embedding_positional_embedding"].shape[0] - 1)
    num_codes = sd["decoder.learnable_embedding.weight"].shape[0] - 1
    k, token_size = sd["decoder.condition_positional_embedding"].shape[0], \
        sd["decoder.decoder_embed.weight"].shape[1]
    if "quantize.shared_linear.weight" not in sd:
        raise ValueError("official SFTok checkpoints use the OptVQ quantizer "
                         "(quantize.shared_linear.*); this state dict has none")
    qsize = sd["quantize.embedding"].shape[-2]
    pixel = any(k_.startswith("pixel_decoder.") for k_ in sd)
    teacher_cfg = (infer_teacher_config(sd, prefix="pixel_",
                                        codebook_key="pixel_quantize.embedding.weight")
                   if pixel else None)
    cfg = TokenizerConfig(
        image_size=patch * enc_grid, num_latent_tokens=k, token_size=token_size,
        encoder=EncoderConfig(width=enc_w, depth=depth("encoder"), heads=max(1, enc_w // 64),
                              mlp_ratio=mlp_ratio("encoder"), patch_size=patch,
                              legacy_reshape=True),
        quantizer=QuantizerConfig(kind="optvq", codebook_size=qsize),
        decoder=DecoderConfig(width=dec_w, depth=depth("decoder"), heads=max(1, dec_w // 64),
                              mlp_ratio=mlp_ratio("decoder")),
        finetune_decoder=pixel)
    return cfg, num_codes, grid, teacher_cfg


def import_official_sftok(source: str | Path | dict[str, Tensor],
                          cfg: TokenizerConfig | None = None, *,
                          assign_at_inference: str | None = "nearest",
                          teacher_cfg: TeacherConfig | None = None,
                          device: str | torch.device | None = None
                          ) -> tuple[SFTok, TokenizerConfig]:
    """An official-format SFTok checkpoint (path or state dict) -> (our SFTok, its config).

    cfg: the tokenizer shape; inferred from the tensors when None (then heads = width // 64).
    The returned config always has encoder.legacy_reshape=True; assign_at_inference sets the
    quantizer's inference assignment ("sinkhorn" = the reference's behaviour; None keeps cfg's).
    Finetuned-decoder checkpoints (pixel_* keys) need finetune_decoder=True (inferred).
    """
    sd = source if isinstance(source, dict) else read_state_dict(source)
    inferred, num_codes, grid, inferred_teacher = infer_tokenizer_config(sd)
    cfg = cfg or inferred
    q = cfg.quantizer if assign_at_inference is None else dataclasses.replace(
        cfg.quantizer, assign_at_inference=assign_at_inference)
    cfg = dataclasses.replace(cfg, quantizer=q,
                              encoder=dataclasses.replace(cfg.encoder, legacy_reshape=True))
    model = SFTok(cfg, num_codes, grid, (teacher_cfg or inferred_teacher) if cfg.finetune_decoder
                  else None)
    ours = convert_official_state_dict(sd)
    check_state_dict(model, ours, "official SFTok state dict (after key mapping)")
    model.load_state_dict(ours, strict=True)
    if device is not None:
        model.to(device)
    return model.eval(), cfg
