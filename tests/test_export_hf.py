"""Hugging Face export: the folder loads offline as a HubertModel whose every hidden state equals ours,
for Post-LN + GroupNorm and Pre-LN + LayerNorm encoders, with masking and padding; the CLI writes the
folder, replaces a previous export, and refuses bad inputs with messages that name the path."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data.stream import StreamConfig  # noqa: E402
from checkpoint_files import seal, write_module_weights  # noqa: E402
from pretrain.config import RunConfig, TrainConfig, to_yaml  # noqa: E402
from pretrain.export import FORMAT as PT_FORMAT  # noqa: E402
from pretrain.downstream.export_hf import MARKER, export_hf, main  # noqa: E402
from pretrain.model import Encoder, EncoderConfig  # noqa: E402

CONV = ((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2  # the real stride-320 stack, small channels
SMALL = dict(conv_layers=CONV, dim=48, layers=2, heads=4, ffn_dim=96, pos_conv_kernel=16, pos_conv_groups=4)
CONFIGS = {
    "post_ln_group": EncoderConfig(**SMALL, conv_norm="group", pre_ln=False),
    "pre_ln_layer": EncoderConfig(**SMALL, conv_norm="layer", pre_ln=True),
    "pre_ln_group": EncoderConfig(**SMALL, conv_norm="group", pre_ln=True),  # MERT-v1-330M's layout
}
TOLERANCE = 1e-4


def perturbed_encoder(cfg: EncoderConfig, seed: int = 0) -> Encoder:
    """Our encoder with norms, biases, weight-norm gains and the mask embedding moved off their
    initial values, so a parameter left unmapped (HF's init instead) shows in the outputs."""
    torch.manual_seed(seed)
    encoder = Encoder(cfg).eval()
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if param.ndim == 1 or "original0" in name:
                param.add_(0.2 * torch.randn_like(param))
    return encoder


def save_pt(encoder: Encoder, path, step: int = 123) -> str:
    """A file in the format `python -m pretrain.export` writes."""
    payload = {"format": PT_FORMAT, "config": json.dumps(asdict(encoder.cfg)), "step": step,
               "state_dict": encoder.state_dict()}
    torch.save(payload, str(path))
    return str(path)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    """(our encoder, the HubertModel loaded from its export, the export folder)."""
    base = tmp_path_factory.mktemp(request.param)
    encoder = perturbed_encoder(CONFIGS[request.param])
    out = str(base / "hf")
    export_hf(save_pt(encoder, base / "model.pt"), out)
    model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return encoder, model.eval(), out


def ours_with_block_input(encoder: Encoder, audio, **kw) -> tuple[dict, torch.Tensor]:
    """Our outputs with all_layers, and the input of the first block (HF's hidden_states[0])."""
    captured = []
    hook = encoder.blocks[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            out = encoder(audio, all_layers=True, **kw)
    finally:
        hook.remove()
    return out, captured[0]


def differences(encoder, model, audio, frames=None, ours_kw=None, hf_kw=None) -> list[float]:
    """Max abs difference of each hidden state: [block input, block 1..L, last_hidden_state], over `frames`."""
    ours, block_input = ours_with_block_input(encoder, audio, **(ours_kw or {}))
    with torch.no_grad():
        theirs = model(audio, output_hidden_states=True, **(hf_kw or {}))
    expected = [block_input, *ours["layers"], ours["x"]]
    got = [*theirs.hidden_states, theirs.last_hidden_state]
    assert len(got) == len(expected) == encoder.cfg.layers + 2
    keep = slice(None) if frames is None else slice(0, frames)
    for a, b in zip(expected, got):
        assert a.shape == b.shape
    return [(a[:, keep] - b[:, keep]).abs().max().item() for a, b in zip(expected, got)]


def test_every_hidden_state_matches_ours(exported):
    encoder, model, _ = exported
    torch.manual_seed(1)
    audio = 0.3 * torch.randn(2, 16000)
    diffs = differences(encoder, model, audio)
    assert max(diffs) < TOLERANCE, diffs
    frames = model(audio).last_hidden_state.shape[1]
    assert frames == encoder.frames(16000) == model._get_feat_extract_output_lengths(16000) == 49
    if encoder.cfg.pre_ln:  # the final norm is in last_hidden_state only: hidden_states[-1] is the raw last block
        with torch.no_grad():
            out = model(audio, output_hidden_states=True)
        assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state, atol=1e-2)


def test_masked_frames_use_the_mask_embedding(exported):
    encoder, model, _ = exported
    torch.manual_seed(2)
    audio = 0.3 * torch.randn(2, 16000)
    mask = torch.rand(2, encoder.frames(16000)) < 0.5
    diffs = differences(encoder, model, audio, ours_kw={"mask": mask}, hf_kw={"mask_time_indices": mask})
    assert max(diffs) < TOLERANCE, diffs
    assert torch.equal(model.masked_spec_embed, encoder.mask_embedding)


def test_padding_matches_lengths(exported):
    encoder, model, _ = exported
    torch.manual_seed(3)
    lengths = torch.tensor([16000, 11000])
    audio = 0.3 * torch.randn(2, 16000) * (torch.arange(16000) < lengths[:, None])
    attention_mask = (torch.arange(16000) < lengths[:, None]).long()
    valid = int(encoder.frames(11000))
    diffs = differences(encoder, model, audio, frames=valid, ours_kw={"lengths": lengths},
                        hf_kw={"attention_mask": attention_mask})
    assert max(diffs) < TOLERANCE, diffs


def test_folder_holds_config_readme_and_feature_extractor(exported):
    encoder, model, out = exported
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", "preprocessor_config.json",
                                              "README.md", MARKER])
    assert type(model).__name__ == "HubertModel"
    assert model.config.do_stable_layer_norm == encoder.cfg.pre_ln
    assert model.config.feat_extract_norm == encoder.cfg.conv_norm
    extractor = transformers.AutoFeatureExtractor.from_pretrained(out)
    assert extractor.sampling_rate == 24000 and extractor.do_normalize is False
    wave = (0.5 + 0.3 * torch.randn(4000)).numpy()
    assert (extractor(wave, sampling_rate=24000, return_tensors="pt").input_values[0].numpy() == wave).all()
    text = open(os.path.join(out, "README.md")).read()
    assert "24000 Hz" in text and "75 Hz" in text and "step 123" in text and "not normalised" in text


def fake_run(encoder: Encoder, run_dir, step: int = 7) -> str:
    """A run directory with one complete checkpoint, as the trainer leaves it (fp32, no DeepSpeed needed)."""
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    module = {f"encoder.{k}": v for k, v in encoder.state_dict().items()} | {"head.weight": torch.zeros(3, 3)}
    write_module_weights(str(folder), module)
    cfg = RunConfig(model=encoder.cfg, data=StreamConfig(shards="unused"), train=TrainConfig(precision="fp32"))
    (folder / "config.yaml").write_text(to_yaml(cfg))
    seal(str(folder), step, world=1)
    return str(run_dir)


def test_cli_exports_a_run_directory_and_replaces_a_previous_export(tmp_path, capsys):
    encoder = perturbed_encoder(CONFIGS["pre_ln_layer"], seed=4)
    run_dir = fake_run(encoder, tmp_path / "run")
    out = tmp_path / "hf"
    for _ in range(2):  # the second export replaces the first
        main(["--ckpt", run_dir, "--out", str(out), "--name", "musicpt-test"])
    assert "step 7" in capsys.readouterr().out
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary folders left
    marker = json.load(open(out / MARKER))
    assert marker["step"] == 7 and marker["name"] == "musicpt-test"
    model = transformers.AutoModel.from_pretrained(str(out)).eval()
    audio = 0.3 * torch.randn(1, 8000)
    assert max(differences(encoder, model, audio)) < TOLERANCE


def test_cli_names_the_path_of_a_bad_ckpt(tmp_path):
    missing = str(tmp_path / "nowhere.pt")
    with pytest.raises(SystemExit) as error:
        main(["--ckpt", missing, "--out", str(tmp_path / "hf")])
    assert missing in str(error.value.code)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as error:
        main(["--ckpt", str(garbage), "--out", str(tmp_path / "hf")])
    assert str(garbage) in str(error.value.code) and "pretrain.export" in str(error.value.code)
    assert not os.path.exists(tmp_path / "hf")


def test_cli_refuses_a_folder_that_is_not_an_export(tmp_path):
    ckpt = save_pt(perturbed_encoder(CONFIGS["post_ln_group"]), tmp_path / "model.pt")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as error:
        main(["--ckpt", ckpt, "--out", str(out)])
    assert str(out) in str(error.value.code) and "not empty" in str(error.value.code)
    assert os.listdir(out) == ["notes.txt"]
