#!/usr/bin/env python
"""Write a MedMNIST 3D set out as a folder of NIfTI (or NumPy) volumes, or as a `datasets` folder: the inputs of
the equivalence check (training from them must give what training from the .npz gives).

    python benchmarks/export_volumes.py --dataset_name adrenalmnist3d --data_dir ../shared/data --output OUT/nifti
    python benchmarks/export_volumes.py --dataset_name adrenalmnist3d --data_dir ../shared/data --format datasets \
        --output OUT/saved --volume_column_name image --label_column_name diagnosis

`--format nifti` (default) writes `OUT/{train,validation,test}/<label name>/<index>.nii.gz`, uint8, identity
affine (1 mm voxels), the index padded so that file-name order is the .npz's order; `npy` the same as `.npy`;
`datasets` saves the `DatasetDict` with `save_to_disk`, its columns renamed as asked. `--max_per_split N` keeps
the first N volumes of each split. Train from the folder with `--data_folder OUT --class_names <MedMNIST's label
order>` (folder names sort alphabetically otherwise).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from vivit_medmnist.data import load_medmnist3d


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset_name", default="adrenalmnist3d")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--output", required=True, help="a new folder")
    parser.add_argument("--format", choices=["nifti", "npy", "datasets"], default="nifti")
    parser.add_argument("--max_per_split", type=int, default=None)
    parser.add_argument("--volume_column_name", default="volume")
    parser.add_argument("--label_column_name", default="label")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        parser.error(f"--output {output} exists and is not empty")
    data = load_medmnist3d(args.dataset_name, size=args.size, data_dir=args.data_dir, download=False)
    if args.max_per_split:
        for split in data:
            data[split] = data[split].select(range(min(args.max_per_split, len(data[split]))))
    names = data["train"].features["label"].names
    if args.format == "datasets":
        renamed = data.with_format(None).rename_columns(
            {"volume": args.volume_column_name, "label": args.label_column_name}
        )
        renamed.save_to_disk(str(output))
        print(f"saved {', '.join(f'{k} {len(v)}' for k, v in renamed.items())} to {output}")
        return output
    import nibabel

    for split, dataset in data.items():
        columns = dataset.with_format("numpy", dtype=np.uint8)[:]
        for index, (volume, label) in enumerate(zip(columns["volume"], columns["label"])):
            folder = output / split / names[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            if args.format == "nifti":
                nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), folder / f"{index:05d}.nii.gz")
            else:
                np.save(folder / f"{index:05d}.npy", volume)
    print(f"wrote {sum(len(d) for d in data.values())} volumes to {output} (classes, in label order: {' '.join(names)})")
    return output


if __name__ == "__main__":
    main()
