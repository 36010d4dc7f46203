"""Compatibility alias: older launch scripts run `python -m training.main`; the trainer is
`open_clip_train`."""
import warnings

warnings.warn("`training` is a deprecated alias of `open_clip_train`", FutureWarning, stacklevel=2)
