"""The sample-quality metrics that quantized-DiT papers report, measured with the reference digit classifier.

FID and sFID (Frechet distances of classifier features), Inception Score, improved precision /
recall (Kynkaanniemi et al., 2019), class accuracy, and PSNR / MSE against the full-precision
model's samples drawn with the same seeds.
"""
import functools
import math
import weakref

import torch

from .classifier import classify, load_classifier
from .limits import MIN_MEASURED

DATA_RANGE = 2.0  # images live in [-1, 1]
_held_out_cache = weakref.WeakKeyDictionary()  # classifier -> its outputs on the held-out digits


def feature_statistics(features):
    """(mean, covariance) in float64 of (N, D) features; the covariance is unbiased, as in ADM's evaluator."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {tuple(features.shape)}")
    features = features.double()
    return features.mean(0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def _psd_sqrt(matrix):
    """Symmetric square root of a covariance; eigenvalues below zero are rounding noise and clamp to 0."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(s1 + s2 - 2 (s1 s2)^1/2), in float64.

    tr((s1 s2)^1/2) equals the sum of square roots of the eigenvalues of the symmetric
    matrix s1^1/2 s2 s1^1/2, which eigh computes stably: no scipy, no complex parts.
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: means {tuple(mu1.shape)}, {tuple(mu2.shape)}, "
                         f"covariances {tuple(sigma1.shape)}, {tuple(sigma2.shape)}")
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return distance.item()


def inception_score(logits, splits=MIN_MEASURED):
    """exp(E_x KL(p(y|x) || p(y))), averaged over `splits` equal parts, as in the original IS code.

    The samples are put in a fixed seeded order first: the original code splits them as given,
    and class-sorted samples (as the held-out digits and per-class sampling are) would give
    every part one class and a score near 1.
    """
    if logits.dim() != 2 or len(logits) < splits or splits < 1:
        raise ValueError(f"need (N >= splits, classes) logits and splits >= 1, got {tuple(logits.shape)}, {splits}")
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(0))
    scores = []
    for part in logits.double()[order.to(logits.device)].tensor_split(splits):
        log_p = part.log_softmax(1)
        log_marginal = log_p.exp().mean(0).log()
        kl = (log_p.exp() * (log_p - log_marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    return sum(scores) / len(scores)


def _knn_radii(features, k, chunk=1024):
    """Distance from each point to its k-th nearest other point: the radius of its hypersphere."""
    if not 1 <= k < len(features):
        raise ValueError(f"need k >= 1 and more than k={k} points for k-NN radii, got {len(features)}")
    # the smallest distance of each row is the point to itself, so the k-th neighbour is the (k+1)-th value
    return torch.cat([torch.cdist(part, features).kthvalue(k + 1, dim=1).values for part in features.split(chunk)])


def _covered(queries, points, radii, chunk=1024):
    """Fraction of `queries` inside at least one hypersphere (points, radii)."""
    inside = [(torch.cdist(part, points) <= radii).any(1) for part in queries.split(chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real_features, fake_features, k=3):
    """Improved precision (fakes on the real manifold) and recall (reals on the fake manifold)."""
    if real_features.dim() != 2 or real_features.shape[1:] != fake_features.shape[1:]:
        raise ValueError(f"need (N, D) features of equal D, got {tuple(real_features.shape)} "
                         f"and {tuple(fake_features.shape)}")
    real, fake = real_features.double(), fake_features.double()
    precision = _covered(fake, real, _knn_radii(real, k))
    recall = _covered(real, fake, _knn_radii(fake, k))
    return precision, recall


def class_accuracy(logits, labels):
    """Fraction of samples the classifier assigns to the class they were generated for."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need (N, classes) logits and (N,) labels, got {tuple(logits.shape)}, {tuple(labels.shape)}")
    return (logits.argmax(1) == labels.to(logits.device)).double().mean().item()


def mse(images, reference):
    """Mean squared error over every pixel of the batch."""
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    return (images.double() - reference.double()).square().mean().item()


def psnr(images, reference):
    """PSNR in dB from the batch MSE for data range 2, as torchmetrics' functional PSNR; inf if identical."""
    error = mse(images, reference)
    return math.inf if error == 0 else 10 * math.log10(DATA_RANGE ** 2 / error)


@functools.cache
def _default_classifier():
    """The committed classifier, loaded once so its held-out outputs stay cached."""
    return load_classifier()


def _held_out_outputs(classifier):
    """The classifier's outputs on the held-out digits, computed once per classifier."""
    if classifier not in _held_out_cache:
        from ..testbed.data import mnist

        _held_out_cache[classifier] = classify(classifier, mnist("held_out")[0])
    return _held_out_cache[classifier]


def evaluate(images, labels, *, reference=None, fp_images=None, classifier=None):
    """Every reported metric of generated `images` (N, 1, 32, 32) in [-1, 1] for class `labels`, as floats.

    `reference` defaults to the 1,000 held-out digits; `fp_images` are the full-precision model's
    samples for the same seeds and labels (psnr_vs_fp / mse_vs_fp are None without them).
    """
    if fp_images is not None and fp_images.shape != images.shape:
        raise ValueError(f"fp_images {tuple(fp_images.shape)} and images {tuple(images.shape)} differ in shape")
    classifier = _default_classifier() if classifier is None else classifier
    real = _held_out_outputs(classifier) if reference is None else classify(classifier, reference)
    fake = classify(classifier, images)
    return {
        "fid": frechet_distance(*feature_statistics(real.features), *feature_statistics(fake.features)),
        "sfid": frechet_distance(*feature_statistics(real.spatial_features),
                                 *feature_statistics(fake.spatial_features)),
        "inception_score": inception_score(fake.logits),
        **dict(zip(("precision", "recall"), precision_recall(real.features, fake.features))),
        "class_accuracy": class_accuracy(fake.logits, labels),
        "psnr_vs_fp": None if fp_images is None else psnr(images, fp_images),
        "mse_vs_fp": None if fp_images is None else mse(images, fp_images),
    }
