"""Paper metrics: Frechet distance against scipy, IS limits, precision/recall limits, PSNR, `evaluate`, Inception FID errors."""
import importlib.util
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from treeq.eval.classifier import DigitClassifier
from treeq.eval.inception import inception_fid
from treeq.eval.metrics import (class_accuracy, evaluate, feature_statistics, frechet_distance, inception_score,
                                mse, precision_recall, psnr)

KEYS = {"fid", "sfid", "inception_score", "precision", "recall", "class_accuracy", "psnr_vs_fp", "mse_vs_fp"}


def _features(n=300, d=16, shift=0.0, seed=0):
    """Correlated Gaussian features, so covariances are full and not diagonal."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator) / d ** 0.5
    return torch.randn(n, d, generator=generator) @ mixing + shift


def _scipy_fid(a, b):
    """The reference formula (pytorch-fid / ADM): sqrtm of sigma1 @ sigma2, real part."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# --- Frechet distance ------------------------------------------------------------------------------

def test_feature_statistics_match_numpy():
    x = _features()
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)


def test_fid_of_a_set_against_itself_is_zero():
    stats = feature_statistics(_features())
    assert abs(frechet_distance(*stats, *stats)) < 1e-8


def test_fid_matches_scipy_reference():
    a, b = _features(seed=0), _features(seed=1, shift=0.3)
    ours = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    reference = _scipy_fid(a.double().numpy(), b.double().numpy())
    assert ours > 0.1
    assert ours == pytest.approx(reference, rel=1e-6)


def test_fid_handles_rank_deficient_covariances():
    """Fewer samples than dimensions (as sFID on a small batch): finite and non-negative."""
    a, b = _features(n=10, d=32, seed=0), _features(n=10, d=32, seed=1)
    distance = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert math.isfinite(distance) and distance > 0


def test_fid_rejects_bad_input():
    mu, sigma = feature_statistics(_features(d=4))
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 4))


# --- Inception Score -------------------------------------------------------------------------------

def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(torch.zeros(100, 10)) == pytest.approx(1.0)


def test_inception_score_of_confident_balanced_predictions_is_ten():
    logits = 100.0 * torch.eye(10).repeat(100, 1)
    assert inception_score(logits, splits=1) == pytest.approx(10.0, rel=1e-6)
    assert 9.0 < inception_score(logits) <= 10.0  # splits of 100 random samples are nearly balanced


def test_inception_score_does_not_depend_on_sample_order():
    """Class-sorted samples would put one class in each split without the fixed shuffle."""
    logits = 100.0 * torch.eye(10).repeat_interleave(100, 0)
    shuffled = logits[torch.randperm(1000, generator=torch.Generator().manual_seed(3))]
    assert inception_score(logits) > 9.0
    assert inception_score(logits) == pytest.approx(inception_score(shuffled), rel=0.02)


def test_inception_score_of_one_class_is_one():
    logits = 100.0 * torch.eye(10)[torch.zeros(50, dtype=torch.long)]
    assert inception_score(logits, splits=5) == pytest.approx(1.0)


def test_inception_score_needs_enough_samples():
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.zeros(5, 10), splits=10)


# --- precision / recall ----------------------------------------------------------------------------

def test_precision_recall_of_identical_sets_is_one():
    x = _features(n=100)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)


def test_precision_of_a_far_set_is_zero():
    real, fake = _features(n=100, seed=0), _features(n=100, seed=1, shift=100.0)
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_collapsed_fakes_have_high_precision_low_recall():
    """Mode collapse: every fake is a real sample, but only 5 of 100 reals are covered."""
    real = _features(n=100)
    fake = real[:5].repeat(20, 1)
    precision, recall = precision_recall(real, fake)
    assert precision == 1.0 and recall < 0.5


def test_precision_recall_rejects_mismatched_features():
    with pytest.raises(ValueError, match="equal D"):
        precision_recall(torch.zeros(10, 4), torch.zeros(10, 5))
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(torch.zeros(3, 4), torch.zeros(10, 4))


# --- accuracy, MSE, PSNR ---------------------------------------------------------------------------

def test_class_accuracy():
    logits = torch.eye(4)
    assert class_accuracy(logits, torch.tensor([0, 1, 2, 0])) == 0.75
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(logits, torch.zeros(3, dtype=torch.long))


def test_psnr_and_mse_match_torchmetrics():
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1
    images = (reference + 0.1 * torch.randn(4, 1, 8, 8, generator=generator)).clamp(-1, 1)
    expected = peak_signal_noise_ratio(images, reference, data_range=2.0).item()
    assert psnr(images, reference) == pytest.approx(expected, rel=1e-5)
    assert mse(images, reference) == pytest.approx((images - reference).square().mean().item(), rel=1e-5)


def test_psnr_of_identical_images_is_infinite():
    x = torch.zeros(2, 1, 4, 4)
    assert psnr(x, x) == math.inf and mse(x, x) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        mse(x, x[:1])


# --- evaluate --------------------------------------------------------------------------------------

@pytest.fixture
def digits():
    """Random 'digits' and a random-weight classifier: `evaluate`'s plumbing does not need real ones."""
    torch.manual_seed(0)
    images = torch.rand(40, 1, 32, 32) * 2 - 1
    return images, torch.arange(40) % 10, DigitClassifier().eval()


def test_evaluate_returns_json_floats(digits):
    images, labels, classifier = digits
    result = evaluate(images[:20], labels[:20], reference=images[20:], classifier=classifier)
    assert set(result) == KEYS
    assert result["psnr_vs_fp"] is None and result["mse_vs_fp"] is None
    assert all(type(result[k]) is float for k in KEYS - {"psnr_vs_fp", "mse_vs_fp"})
    json.dumps(result)


def test_evaluate_against_itself(digits):
    images, labels, classifier = digits
    noisy = images + 0.01 * torch.randn_like(images)
    result = evaluate(images, labels, reference=images, fp_images=noisy, classifier=classifier)
    assert abs(result["fid"]) < 1e-6 and abs(result["sfid"]) < 1e-6
    assert result["precision"] == result["recall"] == 1.0
    assert result["mse_vs_fp"] == pytest.approx(1e-4, rel=0.1)
    assert result["psnr_vs_fp"] == pytest.approx(10 * math.log10(4 / result["mse_vs_fp"]))


def test_evaluate_rejects_mismatched_fp_images(digits):
    images, labels, classifier = digits
    with pytest.raises(ValueError, match="fp_images"):
        evaluate(images, labels, fp_images=images[:5], classifier=classifier)


# --- Inception FID (optional) ----------------------------------------------------------------------

def test_inception_fid_needs_a_weights_file(tmp_path):
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        inception_fid(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32), missing)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_fid_says_what_is_missing(tmp_path):
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"")
    with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
        inception_fid(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32), weights)
