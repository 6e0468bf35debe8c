"""Masked volume modelling (issue 23): no leak through the conv stem's overlapping fields, reconstructions aligned
with the voxels, and the pretrain-then-fine-tune path of the command line."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForPreTraining

from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification
from vivit_medmnist.arguments import parse_args
from vivit_medmnist.modeling_vivit_medmnist import VivitMedmnistForPreTraining, token_owners
from vivit_medmnist.pretraining import MaskedVolumeCollator, main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "medmnist3d_pretrain.yaml"
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TOKENISATIONS = {
    "stem": {"conv_stem_channels": [4, 8, 16], "tubelet_size": 1},  # 64 tokens, fields of 15 voxels every 8
    "valid_tubelets": {},  # the reference: 27 tubelets of 8, voxels 24..27 unread
    "overlapping_same_cls": {"tubelet_size": 6, "tubelet_stride": 5, "padding": "same", "pooling": "cls"},
}


def pretraining_model(name: str) -> VivitMedmnistForPreTraining:
    torch.manual_seed(0)
    config = VivitMedmnistConfig(**TINY, **TOKENISATIONS[name], hidden_dropout_prob=0.0)
    return VivitMedmnistForPreTraining(config).eval()


@pytest.mark.parametrize("name", TOKENISATIONS)
def test_each_voxel_has_at_most_one_owner_inside_its_field(name):
    config = pretraining_model(name).config
    owners = token_owners(config, [28] * 3)
    grid = config.grid_size
    owned = owners >= 0
    token = owners.clamp(min=0)
    per_axis = (token // (grid[1] * grid[2]), token // grid[2] % grid[1], token % grid[2])  # (d, h, w) of the owner
    for axis, ((start, span, step), index) in enumerate(zip(config.token_fields_for([28] * 3), per_axis)):
        voxel = torch.arange(28).view([28 if a == axis else 1 for a in range(3)])
        first = start + index * step
        assert ((voxel >= first) & (voxel < first + span))[owned].all()  # the owner reads the voxel
    if name == "valid_tubelets":
        assert (owners[24:] == -1).all() and (owners[:24, :24, :24] >= 0).all()
    else:
        assert (owners >= 0).all()  # stem and `same` padding: every voxel is some token's
    assert sorted(owners[owners >= 0].unique().tolist()) == list(range(config.num_tokens))


@pytest.mark.parametrize("name", TOKENISATIONS)
def test_masked_voxels_do_not_leak_into_the_encoder(name):
    model = pretraining_model(name)
    config = model.config
    owners = token_owners(config, [28] * 3)
    mask = torch.zeros(2, config.num_tokens, dtype=torch.bool)
    mask[:, ::2] = True
    volumes = torch.rand(2, 28, 1, 28, 28)
    owned_by_masked = mask[0][owners.clamp(min=0)] & (owners >= 0)  # (D, H, W)
    where = owned_by_masked.unsqueeze(1).expand(2, 28, 1, 28, 28)  # (batch, D, C, H, W)
    changed = torch.where(where, torch.rand(volumes.shape), volumes)

    def encoded(pixel_values):
        with torch.no_grad():
            return model(pixel_values=pixel_values, bool_masked_pos=mask, output_hidden_states=True).hidden_states

    # the masked tokens' voxels reach no token, through no overlapping field (every block's output is the same) ...
    for before, after in zip(encoded(volumes), encoded(changed)):
        torch.testing.assert_close(before, after, rtol=0, atol=0)
    # ... while one visible voxel changes what the encoder sees
    visible = (~owned_by_masked & (owners >= 0)).nonzero()[0].tolist()
    nudged = volumes.clone()
    nudged[:, visible[0], 0, visible[1], visible[2]] += 1.0
    assert not torch.equal(encoded(volumes)[-1], encoded(nudged)[-1])


@pytest.mark.parametrize("name", TOKENISATIONS)
def test_reconstruction_puts_each_prediction_on_its_voxel_and_the_loss_reads_masked_voxels_only(name):
    model = pretraining_model(name)
    config = model.config
    fields = config.token_fields_for([28] * 3)
    steps = [step for _, _, step in fields]
    with torch.no_grad():  # every token predicts its cell's voxels as their offset in the cell, 0 .. prod(steps)-1
        model.decoder.weight.zero_()
        model.decoder.bias.copy_(torch.arange(model.decoder.out_features, dtype=torch.float32))
    mask = torch.rand(1, config.num_tokens, generator=torch.Generator().manual_seed(1)) < 0.5
    volumes = torch.rand(1, 28, 1, 28, 28)
    out = model(pixel_values=volumes, bool_masked_pos=mask)
    owners = token_owners(config, [28] * 3)
    expected = torch.zeros(28, 28, 28)
    offsets = [(torch.arange(28) - (start + (span - step) // 2)) % step for start, span, step in fields]
    expected = (offsets[0][:, None, None] * steps[1] + offsets[1][None, :, None]) * steps[2] + offsets[2][None, None]
    expected = torch.where(owners >= 0, expected.float(), 0.0)
    torch.testing.assert_close(out.reconstruction[0, :, 0], expected)
    masked_voxels = mask[0][owners.clamp(min=0)] & (owners >= 0)
    manual = (expected - volumes[0, :, 0])[masked_voxels].square().mean()
    torch.testing.assert_close(out.loss, manual)


def test_pretraining_learns_to_read_the_visible_voxels_and_refuses_what_it_cannot_do():
    model = pretraining_model("stem").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # four volumes of one intensity each: only the visible voxels tell a masked voxel's value
    volumes = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(4, 1, 1, 1, 1).expand(4, 28, 1, 28, 28).clone()
    collator = MaskedVolumeCollator(lambda v, return_tensors: {"pixel_values": torch.as_tensor(v)}, 64, 0.75)
    torch.manual_seed(0)
    mask = collator([{"volume": v} for v in volumes])["bool_masked_pos"]
    assert mask.sum(dim=1).tolist() == [48] * 4  # exactly round(0.75 * 64) per volume
    for _ in range(40):
        optimizer.zero_grad()
        loss = model(pixel_values=volumes, bool_masked_pos=mask).loss
        loss.backward()
        optimizer.step()
    best_constant = volumes.var(unbiased=False).item()  # 0.05: the loss of one value for every volume
    assert loss.item() < 0.2 * best_constant
    with pytest.raises(ValueError, match=r"bool_masked_pos must have shape \(4, 64\), got \(4, 27\)"):
        model(pixel_values=volumes, bool_masked_pos=torch.ones(4, 27, dtype=torch.bool))
    assert type(AutoModelForPreTraining.from_config(model.config)) is VivitMedmnistForPreTraining
    with pytest.raises(ValueError, match="one output per token"):
        VivitMedmnistForPreTraining(VivitMedmnistConfig(**TINY, encoder_type="factorised_encoder"))
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
        MaskedVolumeCollator(None, 64, 1.0)


def test_pretrain_command_then_fine_tune_from_its_folder(shared_data_dir, tmp_path, capsys):
    tiny = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,conv_stem_channels=[4,8,16]"
    common = ["--data_dir", str(shared_data_dir), "--config_overrides", tiny, "--num_train_epochs", "1"]
    folder = tmp_path / "pretrained"
    main(["--recipe", str(RECIPE), "--output_dir", str(folder), "--max_train_samples", "32",
          "--mask_ratio", "0.5", *common])  # fmt: skip
    results = json.loads((folder / "train_results.json").read_text())
    assert results["mask_ratio"] == 0.5 and results["masked_tokens"] == 32 and results["train_volumes"] == 32
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["VivitMedmnistModel"] and config["conv_stem_channels"] == [4, 8, 16]
    saved = load_file(folder / "model.safetensors")
    assert "embeddings.mask_token" not in saved and not any(k.startswith("decoder") for k in saved)

    classifier = VivitMedmnistForVideoClassification.from_pretrained(folder)  # the fine-tuning start
    for name, value in classifier.vivit.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)

    # killed after its first epoch (the last checkpoint and the finished files gone), the run resumes and ends
    # with the same weights (the masks come from torch's generator, whose state the checkpoint holds)
    uninterrupted = tmp_path / "uninterrupted"
    two_epochs = ["--max_train_samples", "32", "--mask_ratio", "0.5", *common, "--num_train_epochs", "2"]
    main(["--recipe", str(RECIPE), "--output_dir", str(uninterrupted), *two_epochs])
    checkpoints = sorted((uninterrupted / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    expected = load_file(uninterrupted / "model.safetensors")
    shutil.rmtree(checkpoints[-1])
    for path in uninterrupted.iterdir():
        if path.is_file():
            path.unlink()
    main(["--recipe", str(RECIPE), "--output_dir", str(uninterrupted), *two_epochs, "--resume_from_checkpoint"])
    resumed = load_file(uninterrupted / "model.safetensors")
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)

    # what pretraining cannot honour is refused before anything is written
    for extra, message in (
        (["--eval_strategy", "epoch"], "pretraining has no validation metric"),
        (["--mask_ratio", "1.5"], r"--mask_ratio must be in \(0, 1\)"),
        (["--mixup_alpha", "0.2"], "mix labels"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--recipe", str(RECIPE), "--output_dir", str(tmp_path / "refused"), *common,
                  *extra])  # fmt: skip
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(SystemExit):  # and the training command says which command the recipe is for
        parse_args(["--recipe", str(RECIPE)])
    assert "a pretraining recipe (mask_ratio): run it with vivit-medmnist-pretrain" in capsys.readouterr().err
