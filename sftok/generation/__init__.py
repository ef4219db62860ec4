"""Class-conditional generation on tokenizer tokens (paper §3.3, §4.3, Table 2).

model.py       MaskGITGenerator: bidirectional transformer over [class ; K tokens] -> B×K×Q
masking.py     training masks and the weighted, label-smoothed loss
guidance.py    classifier-free guidance schedules and the guided logits_fn for `decode`
sampling.py    class-balanced labels, guided sampling (the tokenizer's decode loop), pixels
pretokenize.py dataset tokens (+ flips) with a tokenizer, cached by checkpoint and data
train.py       generator training through the shared resumable loop
evaluate.py    gFID, IS, calibration rows, token statistics, per-class sample grids

Import the modules by path (`from sftok.generation.sampling import sample_tokens`): the package
itself imports nothing, because `sftok.checkpoint` imports `model.py` and `train.py` imports
`sftok.checkpoint`.
"""
