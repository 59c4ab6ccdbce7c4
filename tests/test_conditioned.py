"""Conditioned generation on the default model (issue 17): a reference image's tokens teacher-forced.

On the shipped default model exported to a bundle (ONNX Runtime) and its PyTorch reference: with the mask
all set the output is the reference (indices exactly, image as ``reconstruct`` makes it); with it empty the
output is unconditioned generation; forced positions hold the reference token and a flipped forced token
changes only later scales; mixed batches are batch-invariant; torch and ONNX Runtime agree token for token.
The masks (``core.conditioning``) and the command line (one ``Error:`` line, nothing written) too.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imagefolder.core.conditioning import cell_fractions, force_mask, region_positions
from imagefolder.core.schedule import SamplingParams, scale_spans
from imagefolder.errors import InputError
from imagefolder.runtime.loop import generate

PARAMS = SamplingParams(cfg=3.0, top_k=40, top_p=0.95, seed=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(ort backend, torch backend, reference (1, 3, H, H), its indices (1, 2, P), folder) on the default model."""
    from imagefolder.core.bundle import load_bundle
    from imagefolder.core.images import load_images, save_png
    from imagefolder.data import HELDOUT_SEED, ShapesDataset
    from imagefolder.default_model import load_default_or_checkpoint
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.runtime.backends.ort import OrtBackend
    from imagefolder.runtime.backends.torch_backend import TorchBackend

    root = tmp_path_factory.mktemp("conditioned")
    config, tokenizer, generator, source = load_default_or_checkpoint()
    bundle = load_bundle(
        export_bundle(root / "bundle", tokenizer, generator, config, batch_max=4, source=source, progress=False)
    )
    ort_backend = OrtBackend(bundle, threads=1)
    image = ShapesDataset(config.tokenizer.image_size, seed=HELDOUT_SEED)[3][0].numpy()[None]
    save_png(root / "reference.png", image)
    image = load_images([root / "reference.png"], config.tokenizer.image_size)  # as the command line reads it
    indices = ort_backend.encode(image)
    return ort_backend, TorchBackend(tokenizer, generator, bundle.candidates), image, indices, root


def test_the_exported_sampler_selects_with_where_and_passes_the_tensorrt_10_3_operator_report(model):
    ort_backend = model[0]
    graph = ort_backend.bundle.manifest["graphs"]["sampler"]
    report = graph["operators"]
    assert report["ok"] and not report["unsupported"] and report["opset"] == 17
    assert report["counts"]["Where"] >= 1 and "If" not in report["counts"]
    assert [t["name"] for t in graph["inputs"]][-2:] == ["reference_tokens", "force_mask"]
    assert graph["inputs"][-1]["dtype"] == "bool" and graph["parity"]["outputs"]["tokens"]["value"] == 0.0


def test_the_mask_all_set_gives_the_reference_and_reconstruct_s_image(model):
    ort_backend, torch_backend, image, indices, _ = model
    everything = np.ones((indices.shape[2], 2), bool)
    for backend in (ort_backend, torch_backend):
        result = generate(backend, [7], PARAMS, reference=indices, force=everything)
        np.testing.assert_array_equal(result.indices, indices)
        reconstruction = ort_backend.decode(ort_backend.encode(image))  # what `reconstruct` computes
        assert np.abs(result.images - reconstruction).max() <= 1e-5


def test_the_mask_empty_gives_unconditioned_generation(model):
    ort_backend, torch_backend, _, indices, _ = model
    nothing = np.zeros((indices.shape[2], 2), bool)
    for backend in (ort_backend, torch_backend):
        plain = generate(backend, [2, 5], PARAMS)
        conditioned = generate(backend, [2, 5], PARAMS, reference=indices, force=nothing)
        np.testing.assert_array_equal(conditioned.indices, plain.indices)
        np.testing.assert_array_equal(conditioned.images, plain.images)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_scales_of_every_scale_reproduces_the_reference_for_any_class_and_seed(model, seed):
    ort_backend, _, _, indices, _ = model
    scales = ort_backend.scales
    result = generate(
        ort_backend,
        [seed, 9 - seed, 4],
        SamplingParams(seed=seed),
        reference=indices,
        force=force_mask(scales, keep_scales=len(scales)),
    )
    np.testing.assert_array_equal(result.indices, np.repeat(indices, 3, axis=0))


def test_forced_positions_hold_the_reference_and_a_flip_changes_only_later_scales(model):
    ort_backend, _, _, indices, _ = model
    scales = ort_backend.scales
    spans = scale_spans(scales)
    keep = force_mask(scales, keep="detail")
    result = generate(ort_backend, [3], PARAMS, reference=indices, force=keep).indices
    np.testing.assert_array_equal(result[:, 0], indices[:, 0])  # the detail branch is the reference's
    assert (result[:, 1] != indices[:, 1]).any()  # the semantic branch was sampled

    flipped = indices.copy()
    si = 2
    position = spans[si][0]  # the first token of scale 2, detail branch
    flipped[0, 0, position] = (indices[0, 0, position] + 1) % ort_backend.codebook_size
    again = generate(ort_backend, [3], PARAMS, reference=flipped, force=keep).indices
    end = spans[si][0] + spans[si][1]
    changed = np.nonzero((again != result)[0].any(axis=0))[0]
    assert changed.min() == position  # the flipped token itself, and nothing before it
    assert (again[0, 1, :end] == result[0, 1, :end]).all()  # its scale's sampled tokens were drawn before it
    assert changed.max() >= end  # the change reached later scales, through the fold and the cache


def test_mixed_batches_are_batch_invariant_and_torch_agrees(model):
    ort_backend, torch_backend, _, indices, _ = model
    scales, positions = ort_backend.scales, indices.shape[2]
    masks = np.stack(
        [
            force_mask(scales, keep="semantic"),
            np.zeros((positions, 2), bool),
            force_mask(scales, keep_scales=3),
            force_mask(scales, keep="detail"),
        ]
    )
    labels = [1, 6, 8, 0]
    batch = generate(ort_backend, labels, PARAMS, reference=indices, force=masks)
    for i, label in enumerate(labels):
        # Alone, image i is the first image of its request: index its uniforms by hand with a request of i + 1.
        alone = generate(ort_backend, [label] * (i + 1), PARAMS, reference=indices, force=masks[i])
        np.testing.assert_array_equal(alone.indices[i], batch.indices[i])
    np.testing.assert_array_equal(
        generate(ort_backend, [6, 6], PARAMS).indices[1], batch.indices[1]
    )  # the unconditioned image is unconditioned generation
    for size in (1, 4):
        on_torch = generate(torch_backend, labels[:size], PARAMS, reference=indices, force=masks[:size])
        np.testing.assert_array_equal(on_torch.indices, batch.indices[:size])


def test_reference_images_are_encoded_on_the_backend(model):
    ort_backend, _, image, indices, _ = model
    keep = force_mask(ort_backend.scales, keep="detail")
    from_image = generate(ort_backend, [3, 4], PARAMS, reference_images=image, force=keep)
    from_indices = generate(ort_backend, [3, 4], PARAMS, reference=indices, force=keep)
    np.testing.assert_array_equal(from_image.indices, from_indices.indices)
    with pytest.raises(InputError, match="reference images have shape"):
        generate(ort_backend, [3], PARAMS, reference_images=image[:, :, :8], force=keep)


def test_region_cells_follow_the_half_area_rule():
    region = np.zeros((10, 10), bool)
    region[:, :5] = True  # the left half
    np.testing.assert_allclose(cell_fractions(region, 2), [[1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(cell_fractions(region, 3)[:, 1], [0.5, 0.5, 0.5])  # the middle column: half kept
    kept = region_positions(region, (1, 2, 3))
    # scale 1×1: half kept → kept; 2×2: the left column; 3×3: left and middle columns (≥ ½)
    assert kept.tolist() == [True] + [True, False, True, False] + [True, True, False] * 3
    with pytest.raises(InputError, match="keeps no cell at any scale"):
        region_positions(np.zeros((10, 10), bool), (1, 2, 3))
    with pytest.raises(InputError, match="generates no cell at any scale"):
        region_positions(np.ones((10, 10), bool), (1, 2, 3))
    both = force_mask((1, 2), keep="semantic", keep_scales=1, region=region)
    assert both.tolist() == [[True, True], [False, True], [False, False], [False, True], [False, False]]


# -- the command line --------------------------------------------------------------------------------------------


def _run(args: list) -> tuple[int, str]:
    from imagefolder.cli.main import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_the_command_line_variation_and_reconstruct_indices(model, tmp_path):
    ort_backend, _, _, indices, root = model
    bundle, reference = root / "bundle", root / "reference.png"
    code, output = _run(
        ["reconstruct", "--bundle", bundle, reference, "-o", tmp_path / "r.png", "--indices", tmp_path / "r.npy"]
    )
    assert code == 0, output
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), indices)
    args = ["generate", "--bundle", bundle, "--class", "3", "--seed", "4", "--cfg", "3", "--top-k", "40"]
    code, output = _run(
        [*args, "--reference", reference, "--keep", "detail", "-o", tmp_path / "a.png", "--indices", tmp_path / "a.npy"]
    )
    assert code == 0, output
    code, output = _run(
        [*args, "--reference-indices", tmp_path / "r.npy", "-o", tmp_path / "b.png", "--indices", tmp_path / "b.npy"]
    )  # no --keep: the detail branch, as the help says
    assert code == 0, output
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy")[:, 0], indices[:, 0])
    code, output = _run(["generate", "--help"])
    assert "at least 0.5 of its area is white" in " ".join(output.split())


@pytest.mark.parametrize(
    "case, culprit",
    [
        ("mask-without-reference", "--mask needs a reference"),
        ("mask-not-an-image", "mask.txt"),
        ("mask-keeps-nothing", "keeps no cell at any scale"),
        ("mask-generates-nothing", "generates no cell at any scale"),
        ("indices-wrong-shape", "reference indices have shape (2, 5)"),
        ("indices-out-of-range", "this model's codebook holds"),
        ("indices-not-npy", "is not a .npy array"),
        ("reference-not-an-image", "reference.txt"),
        ("both-references", "not both"),
        ("keep-scales-too-many", "--keep-scales must be in"),
        ("schema-4-bundle", "re-export the bundle"),
    ],
)
def test_bad_conditioning_input_is_one_error_line_and_writes_nothing(model, tmp_path, case, culprit):
    import json
    import shutil

    _, _, _, indices, root = model
    bundle, reference = root / "bundle", root / "reference.png"
    (tmp_path / "mask.txt").write_text("not a picture")
    (tmp_path / "reference.txt").write_text("not a picture")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "black.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "white.png")
    np.save(tmp_path / "short.npy", np.zeros((2, 5), np.int32))
    np.save(tmp_path / "large.npy", indices + 10_000)
    (tmp_path / "bad.npy").write_bytes(b"nonsense")
    old = tmp_path / "old-bundle"
    if case == "schema-4-bundle":
        shutil.copytree(bundle, old)
        manifest = json.loads((old / "manifest.json").read_text())
        (old / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 4}))
    base = ["generate", "--bundle", old if case == "schema-4-bundle" else bundle, "-o", tmp_path / "out.png"]
    extra = {
        "mask-without-reference": ["--mask", tmp_path / "white.png"],
        "mask-not-an-image": ["--reference", reference, "--mask", tmp_path / "mask.txt"],
        "mask-keeps-nothing": ["--reference", reference, "--mask", tmp_path / "black.png"],
        "mask-generates-nothing": ["--reference", reference, "--mask", tmp_path / "black.png", "--invert-mask"],
        "indices-wrong-shape": ["--reference-indices", tmp_path / "short.npy"],
        "indices-out-of-range": ["--reference-indices", tmp_path / "large.npy"],
        "indices-not-npy": ["--reference-indices", tmp_path / "bad.npy"],
        "reference-not-an-image": ["--reference", tmp_path / "reference.txt"],
        "both-references": ["--reference", reference, "--reference-indices", tmp_path / "short.npy"],
        "keep-scales-too-many": ["--reference", reference, "--keep-scales", 99],
        "schema-4-bundle": ["--reference", reference, "--keep", "detail"],
    }[case]
    code, output = _run([*base, *extra, "--indices", tmp_path / "out.npy"])
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in output, output
    assert culprit in errors[0], errors[0]
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "out.npy").exists()


def test_profile_with_a_reference_has_an_encode_stage_in_its_table_json_and_plot(model, tmp_path):
    import json

    from imagefolder.runtime.plots import _bar_groups

    _, _, _, _, root = model
    args = ["profile", "--bundle", root / "bundle", "--reference", root / "reference.png", "--keep", "semantic"]
    code, output = _run([*args, "--runs", 2, "--warmup", 1, "--json", tmp_path / "p.json"])
    assert code == 0, output
    assert any(line.startswith("encode ") for line in output.splitlines())
    (report,) = json.loads((tmp_path / "p.json").read_text())["reports"]
    assert [s["label"] for s in report["stages"]][:2] == ["encode", "prefill"]
    assert report["stages"][0]["host_ms"]["n"] == 2
    assert _bar_groups(report, (1, 2, 3, 4, 6))[0] == ("encode", ["encode"])
    code, output = _run([*args, "--runs", 1, "--warmup", 0, "--plot", tmp_path / "p.png"])
    assert code == 0, output
    assert "encode" in [t.get_text() for t in _plotted_ticks(report)]
    code, output = _run([*args[:3], "--reference-indices", tmp_path / "p.json"])
    assert code == 1 and "Error:" in output


def _plotted_ticks(report: dict) -> list:
    from imagefolder.runtime.plots import profile_figure

    return profile_figure([report], (1, 2, 3, 4, 6)).axes[0].get_xticklabels()
