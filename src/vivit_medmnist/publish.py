"""Push a model folder written by vivit-medmnist-train to the Hugging Face Hub.

    vivit-medmnist-publish outputs/organmnist3d --repo_id my-user/vivit-organmnist3d --dry_run
    vivit-medmnist-publish outputs/organmnist3d --repo_id my-user/vivit-organmnist3d [--private]

Only the files the model needs are uploaded (`vivit_medmnist.hub_files.publishable_files`): the weights as
safetensors, config.json, preprocessor_config.json, the code files those configs name (and what they import),
README.md with the images it shows, and the metrics train.py wrote (*_results.json). Anything else at the top of
the folder (a script, notes) is left out and listed; `checkpoints/` and anything pickled (training_args.bin,
optimizer.pt, ...) never go.

Before uploading, the folder is checked: model.safetensors, config.json, preprocessor_config.json and README.md
are there, nothing that would be uploaded is pickled, the model card's metadata parses, and a copy of exactly the
files to upload loads and runs with `AutoModelForVideoClassification.from_pretrained(..., trust_remote_code=True)`
in a Python process where `vivit_medmnist` cannot be imported (what a Hub user without this package gets). The
repo id is filled into the model card's loading example.

`--dry_run` prints the files (with sizes) that would be uploaded and the check's result, uploads nothing, and
exits 0 when the check passes (1 otherwise). The token comes from the usual places (`HF_TOKEN`, or
`hf auth login`), read by huggingface_hub.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub import constants as hf_constants

from vivit_medmnist.hub_files import check_folder, left_out_files, stage_for_upload


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="the output folder of vivit-medmnist-train")
    parser.add_argument(
        "--repo_id", default=None, help="the Hub model repository, ORG/NAME (required unless --dry_run)"
    )
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument(
        "--revision", default=None, help="the branch to push to (created if missing; default main)"
    )
    parser.add_argument("--commit_message", default=None, help="the commit message")
    parser.add_argument(
        "--dry_run", action="store_true", help="print and check what would be uploaded; upload nothing"
    )
    args = parser.parse_args(argv)
    if not args.dry_run and not args.repo_id:
        parser.error("--repo_id ORG/NAME is required (or use --dry_run)")
    return args


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def main(argv=None) -> None:
    args = parse_args(argv)
    folder = Path(args.output_dir)
    if not folder.is_dir():
        sys.exit(f"error: {folder} is not a folder (expected the output folder of vivit-medmnist-train)")
    token = None
    if not args.dry_run:  # fail fast, before the load check
        token = get_token()
        if token is None:
            sys.exit(
                "error: no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write "
                "access (https://huggingface.co/settings/tokens); --dry_run needs none"
            )
        if hf_constants.HF_HUB_OFFLINE:
            sys.exit(
                "error: cannot upload: offline mode is on (HF_HUB_OFFLINE=1); unset it, or use --dry_run"
            )

    check = check_folder(folder)
    print(
        f"{'Would upload' if args.dry_run else 'Uploading'} {len(check.files)} files from {folder}"
        + (f" to {args.repo_id}" if args.repo_id else "")
        + ":"
    )
    for name, size in check.files.items():
        print(f"  {name:<40} {human_size(size):>10}")
    print(f"  total {human_size(sum(check.files.values()))}")
    if left_out := left_out_files(folder):
        print(f"Left out (not needed by the model): {', '.join(left_out)}")
    if not check.ok:
        print("Check FAILED:\n- " + "\n- ".join(check.problems), file=sys.stderr)
        sys.exit(1)
    report = check.load_report
    print(
        f"Check passed: the files load with trust_remote_code=True without vivit_medmnist "
        f"({report['model_class'].rsplit('.', 1)[-1]}, {report['num_labels']} labels) and run."
    )
    if args.dry_run:
        print("Dry run: nothing uploaded.")
        return

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="vivit-publish-") as staging:
        stage_for_upload(
            folder, staging, repo_id=args.repo_id
        )  # exactly the checked files, card with repo id
        try:
            url = api.create_repo(args.repo_id, private=args.private or None, exist_ok=True)
            if args.revision:
                api.create_branch(args.repo_id, branch=args.revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=args.repo_id,
                folder_path=staging,  # exactly the staged files
                revision=args.revision,
                commit_message=args.commit_message or f"Upload ViViT-MedMNIST model from {folder.name}",
            )
        except Exception as err:  # noqa: BLE001 -- HTTP/auth/validation errors all end the script the same way
            sys.exit(f"error: uploading to {args.repo_id} failed: {type(err).__name__}: {err}")
    print(f"Uploaded to {url} ({commit.commit_url})")


if __name__ == "__main__":
    main()
