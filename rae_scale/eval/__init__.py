"""Evaluation: the TF-2015 Inception, ADM-compatible FID/sFID/IS/P&R, PSNR/SSIM, distributed sampling.

Import the modules themselves (features, inception, metrics, reference, ...): nothing is re-exported
here, so importing one does not build the others. Ray is imported only by
:mod:`rae_scale.eval.sampling_workers`.
"""
