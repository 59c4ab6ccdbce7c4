"""``make demo``: the whole path on the default model, in about a minute on two CPU cores.

1. export the shipped default model to an ONNX bundle (``demo-out/bundle``);
2. generate one image per class on ONNX Runtime (``demo-out/samples.png``);
3. generate the same with the PyTorch reference and check the tokens are identical;
4. one row of variations: a reference shape, then images that keep its detail tokens (``demo-out/variations.png``);
5. profile the loop on ONNX Runtime and print the per-step table (JSON and a Chrome trace beside it).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from imagefolder.core.bundle import load_bundle
    from imagefolder.core.conditioning import force_mask
    from imagefolder.core.images import save_grid
    from imagefolder.core.schedule import SamplingParams
    from imagefolder.data import HELDOUT_SEED, ShapesDataset
    from imagefolder.default_model import load_default_or_checkpoint
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.runtime.backends.ort import OrtBackend
    from imagefolder.runtime.backends.torch_backend import TorchBackend
    from imagefolder.runtime.loop import generate
    from imagefolder.runtime.profiler import profile_generation

    config, tokenizer, generator, source = load_default_or_checkpoint()
    print(
        f"default model: {config.name} ({sum(p.numel() for p in generator.parameters()) / 1e6:.1f} M generator "
        f"parameters, {config.generator.num_classes} classes, scales {list(config.generator.scales)})"
    )
    batch_max = max(8, config.generator.num_classes)  # one image per class in one batch
    bundle_dir = export_bundle(args.out / "bundle", tokenizer, generator, config, batch_max=batch_max, source=source)
    bundle = load_bundle(bundle_dir)
    print(f"exported {bundle_dir}: {', '.join(sorted(bundle.manifest['graphs']))}")

    labels = np.arange(config.generator.num_classes)
    params = SamplingParams(cfg=3.0, top_k=40, top_p=0.95, seed=args.seed)
    with OrtBackend(bundle) as ort_backend:
        result = generate(ort_backend, labels, params)
        samples = save_grid(args.out / "samples.png", result.images, columns=5)
        print(f"wrote {samples}: classes {labels.tolist()} (row-major), ONNX Runtime, seed {args.seed}")

        torch_result = generate(TorchBackend(tokenizer, generator, bundle.candidates), labels, params)
        same = np.array_equal(result.indices, torch_result.indices)
        print(
            f"PyTorch reference: tokens {'identical' if same else 'DIFFERENT'} "
            f"({result.indices.size} indices), max image difference "
            f"{np.abs(result.images - torch_result.images).max():.1e}"
        )

        reference = ShapesDataset(config.tokenizer.image_size, seed=HELDOUT_SEED)[3][0].numpy()[None]
        label = 3  # the reference's class
        variations = generate(
            ort_backend,
            [label] * 4,
            params,
            force=force_mask(bundle.scales, keep="detail"),
            reference_images=reference,
        )
        row = save_grid(args.out / "variations.png", np.concatenate([reference, variations.images]), columns=5)
        print(f"wrote {row}: a reference (class {label}), then 4 variations keeping its detail tokens (--keep detail)")

        profile = profile_generation(ort_backend, [1, 4], params, runs=5, warmup=1)
    print(profile.table())
    profile.write_json(args.out / "profile.json")
    profile.write_trace(args.out / "trace.json")
    print(f"wrote {args.out / 'profile.json'} and {args.out / 'trace.json'} (open the trace in Perfetto)")
    if not same:
        raise SystemExit("the ONNX Runtime and PyTorch tokens differ: please report this")


if __name__ == "__main__":
    main()
