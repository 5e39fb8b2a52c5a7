"""Optional Inception-v3 FID, for comparing with numbers reported on ImageNet-scale models.

Wraps torchmetrics' FrechetInceptionDistance with a local weights file (torch-fidelity's
`pt_inception-2015-12-05-6726825d.pth`); nothing is downloaded. torchmetrics builds its Inception
from torch-fidelity, which depends on torchvision, so this works only where both are installed.
"""
from pathlib import Path


def _to_unit_rgb(images):
    """[-1, 1] (N, 1 or 3, H, W) -> [0, 1] RGB floats; Inception resizes to 299x299 itself."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"need images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    return ((images.float() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)


def inception_fid(images, reference_images, weights_path, batch_size=100):
    """FID between two image sets in [-1, 1], on Inception pool features loaded from `weights_path`."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"no Inception weights at {weights_path}")
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics builds its Inception from it)
    except ImportError:
        raise ModuleNotFoundError("Inception FID needs torch-fidelity (and the torchvision it depends on); "
                                  "install both in an environment with a matching torch") from None
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights_path))
    for batch in _to_unit_rgb(reference_images).split(batch_size):
        metric.update(batch, real=True)
    for batch in _to_unit_rgb(images).split(batch_size):
        metric.update(batch, real=False)
    return metric.compute().item()
