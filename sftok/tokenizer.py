"""SFTok: encoder + quantizer + decoder over teacher proxy codes [+ pixel path] (DESIGN §1).

    images B×3×H×W --encoder--> z B×K×C --quantize--> z_q B×K×C (ids B×K)
    (proxy ids B×N, z_q) --decoder--> logits B×N×V        (mask id = V)
    multi-step decoding (sftok.decoding) -> ids B×N --teacher decoder--> pixels
    or, for a fine-tuned decoder (stage 3, golden README item 6):
    softmax(logits) @ pixel_quantize (V×Z) -> pixel_decoder -> pixels

The frozen teacher is never a submodule (it is passed in), so it is in neither `parameters()`
nor `state_dict()`; `pixel_quantize` / `pixel_decoder` are the tokenizer's own trainable copies
of the teacher's codebook and decoder, present only when `cfg.finetune_decoder`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sftok.config import DecodeConfig, TeacherConfig, TokenizerConfig
from sftok.decoder import Decoder
from sftok.decoding import DecodeResult, decode
from sftok.encoder import Encoder
from sftok.nn.vit import init_vit_weights
from sftok.quantizer import QuantOutput, build_quantizer
from sftok.teacher import FrozenTeacher, VQGANDecoder, VQGANQuantizer


class SFTok(nn.Module):
    """The tokenizer. num_codes = V (teacher codebook), grid = side of the teacher's code grid."""

    def __init__(self, cfg: TokenizerConfig, num_codes: int, grid: int,
                 teacher_cfg: TeacherConfig | None = None):
        super().__init__()
        self.cfg, self.num_codes, self.grid, self.teacher_cfg = cfg, num_codes, grid, teacher_cfg
        self.mask_id = num_codes  # V
        self.num_positions = grid * grid  # N
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, num_codes, grid)
        # The reference's initialisation (trunc-normal 0.02) covers the ViTs, not the quantizer.
        self.apply(init_vit_weights)
        self.quantize = build_quantizer(cfg.quantizer, cfg.token_size)
        self.pixel_quantize: VQGANQuantizer | None = None
        self.pixel_decoder: VQGANDecoder | None = None
        if cfg.finetune_decoder:
            if teacher_cfg is None:
                raise ValueError("finetune_decoder=True needs teacher_cfg (the pixel decoder is a "
                                 "copy of the teacher's decoder)")
            if teacher_cfg.codebook_size != num_codes:
                raise ValueError(f"teacher codebook {teacher_cfg.codebook_size} != num_codes "
                                 f"{num_codes}")
            # Same layout as the teacher's quantizer (key pixel_quantize.embedding.weight, V×Z).
            self.pixel_quantize = VQGANQuantizer(num_codes, teacher_cfg.z_channels)
            self.pixel_decoder = VQGANDecoder(teacher_cfg)

    # -- encoding --------------------------------------------------------------------------

    def encode(self, images: Tensor) -> QuantOutput:
        """images B×3×H×W in [0, 1] -> QuantOutput (z_q B×K×C straight-through, ids B×K, loss)."""
        return self.quantize(self.encoder(images))

    def ids_to_latent(self, ids: Tensor) -> Tensor:
        """token ids B×K -> z_q B×K×C (normalised codes)."""
        return self.quantize.ids_to_latent(ids)

    # -- decoding --------------------------------------------------------------------------

    def decoder_logits(self, proxy_ids: Tensor, z_q: Tensor) -> Tensor:
        """proxy ids B×N (V = masked), z_q B×K×C -> logits B×N×V."""
        return self.decoder(proxy_ids, z_q)

    def forward(self, images: Tensor, proxy_ids: Tensor) -> tuple[Tensor, QuantOutput]:
        """Training pass: (images, proxy ids B×N) -> (logits B×N×V, QuantOutput)."""
        q = self.encode(images)
        return self.decoder_logits(proxy_ids, q.z_q), q

    @torch.no_grad()
    def generate(self, z_q: Tensor, cfg: DecodeConfig, generator: torch.Generator | None = None,
                 trace: bool = False) -> DecodeResult:
        """Multi-step masked decoding conditioned on z_q B×K×C (inference, no autograd)."""
        return decode(lambda ids: self.decoder_logits(ids, z_q), z_q.shape[0],
                      self.num_positions, self.mask_id, cfg, generator=generator, trace=trace,
                      device=z_q.device)

    def pixels_from_logits(self, logits: Tensor) -> Tensor:
        """Soft pixel path (finetune_decoder): logits B×N×V -> pixels B×3×H×W (not clamped).

        softmax over the V codes, weighted sum of `pixel_quantize` rows, the N vectors laid on
        the grid in raster order, then `pixel_decoder` (golden README item 6).
        """
        if self.pixel_decoder is None:
            raise RuntimeError("pixels_from_logits needs a tokenizer built with "
                               "finetune_decoder=True")
        b = logits.shape[0]
        soft = logits.softmax(dim=-1) @ self.pixel_quantize.embedding.weight  # B×N×Z
        latent = soft.transpose(1, 2).reshape(b, -1, self.grid, self.grid)  # B×Z×g×g
        return self.pixel_decoder(latent)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, teacher: FrozenTeacher | None, cfg: DecodeConfig,
                    generator: torch.Generator | None = None) -> Tensor:
        """images -> encode -> S-step decode -> pixels B×3×H×W clamped to [0, 1].

        Pixels come from the soft path when the tokenizer has a fine-tuned pixel decoder, else
        from the teacher's decoder on the final ids (then `teacher` is required).
        """
        return self.pixels_from_latent(self.encode(images).z_q, teacher, cfg, generator)

    def pixels_from_latent(self, z_q: Tensor, teacher: FrozenTeacher | None, cfg: DecodeConfig,
                           generator: torch.Generator | None = None) -> Tensor:
        """z_q B×K×C -> S-step decode -> pixels B×3×H×W clamped to [0, 1] (see `reconstruct`);
        lets a caller decode one encoding with several step counts."""
        res = self.generate(z_q, cfg, generator=generator)
        if self.pixel_decoder is not None:
            return self.pixels_from_logits(res.last_logits).clamp(0.0, 1.0)
        if teacher is None:
            raise ValueError("reconstruct: a teacher is needed to decode ids to pixels")
        return teacher.decode_ids(res.ids)
