"""Evaluation: reconstruction quality over decode steps (PSNR, SSIM, LPIPS, rFID, IS), token
metrics and the Figure-4a per-step trace (DESIGN §1; docs/architecture.md `sftok/evaluate/`)."""
from sftok.evaluate.evaluate import EvalResult, dataset_key, evaluate, format_table
from sftok.evaluate.fid import find_inception_weights, frechet_distance
from sftok.evaluate.trace import TRACE_COLUMNS, compute_trace

__all__ = [
           "TRACE_COLUMNS",
           "EvalResult",
           "compute_trace",
           "dataset_key",
           "evaluate",
           "find_inception_weights",
           "format_table",
           "frechet_distance",
]
