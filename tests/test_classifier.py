"""The reference digit classifier: committed weights, output shapes, loading errors, augmentation, held-out accuracy."""
import pytest
import torch
from safetensors import safe_open

from treeq.eval.classifier import (WEIGHTS_PATH, ClassifierOutput, DigitClassifier, classify, load_classifier,
                                   random_shift, save_classifier)
from treeq.eval.metrics import evaluate
from treeq.models.checkpoint import CheckpointError


def _images(n=4, seed=0):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_committed_weights_are_small_and_record_their_accuracy():
    assert WEIGHTS_PATH.stat().st_size < 2 * 2 ** 20
    with safe_open(str(WEIGHTS_PATH), "pt") as file:
        assert float(file.metadata()["held_out_accuracy"]) >= 0.97


def test_outputs_have_the_documented_shapes():
    output = load_classifier()(_images(3))
    assert isinstance(output, ClassifierOutput)
    assert [tuple(t.shape) for t in output] == [(3, 10), (3, 128), (3, 256)]


def test_forward_rejects_other_image_shapes():
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        DigitClassifier()(torch.zeros(2, 3, 32, 32))


def test_classify_in_batches_equals_one_forward():
    classifier = load_classifier()
    images = _images(10)
    batched = classify(classifier, images, batch_size=3)
    with torch.no_grad():
        whole = classifier(images)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(batched, whole))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    classifier = DigitClassifier().eval()
    path = tmp_path / "sub" / "classifier.safetensors"
    save_classifier(classifier, path, {"seed": "0"})
    loaded = load_classifier(path)
    with torch.no_grad():
        assert torch.equal(loaded(_images()).logits, classifier(_images()).logits)
    assert not list(path.parent.glob("*.tmp"))


def test_load_errors_name_the_problem(tmp_path):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(FileNotFoundError, match="python -m treeq.eval.classifier"):
        load_classifier(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(WEIGHTS_PATH.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_classifier(corrupt)


def test_random_shift_moves_a_pixel_at_most_two_steps():
    images = -torch.ones(50, 1, 32, 32)
    images[:, :, 16, 16] = 1.0
    shifted = random_shift(images, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    rows, cols = (shifted[:, 0] == 1.0).nonzero()[:, 1:].T
    assert len(rows) == 50  # the pixel survives in every image, border filled with background
    assert (rows - 16).abs().max() <= 2 and (cols - 16).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5


@pytest.mark.slow
def test_held_out_accuracy_and_default_reference():
    """The committed weights on all 1,000 held-out digits; real digits score FID ~ 0 against themselves."""
    from treeq.testbed.data import mnist

    images, labels = mnist("held_out")
    result = evaluate(images, labels)
    assert result["class_accuracy"] >= 0.97
    assert abs(result["fid"]) < 1e-3 and abs(result["sfid"]) < 1e-3  # float64 rounding on traces of ~1e3
    assert result["precision"] == result["recall"] == 1.0
    assert result["inception_score"] > 9.0
