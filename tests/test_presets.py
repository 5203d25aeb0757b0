"""--preset: one flag sets a column of Table 4, --help shows it, and a flag given on the command line wins."""

import subprocess
import sys

import pytest
from conftest import ROOT

import empo_cluster as ec
import empo_highlevel as eh
import empo_ppo as ep

D4RL = {  # Table 4, D4RL column (Appendix B: hidden 256)
    ec: dict(em_epochs=100, bias_epochs=3, pretrain_epochs=20, momentum=0.9, hidden_dim=256, batch_size=256),
    ep: dict(gamma=0.99, q_steps=1_500_000, q_target_every=2, q_target_rate=0.005, v_epochs=40, pi_epochs=100),
    eh: dict(gamma=0.99, expectile=0.7, target_every=500, steps=1_000_000, b=5.0, n_step=3),
}
NAV = {
    ec: dict(em_epochs=60, hidden_dim=64),
    ep: dict(gamma=0.999, q_steps=200_000, v_epochs=10, pi_epochs=10),
    eh: dict(gamma=0.999, expectile=0.9),
}


def parse(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    return module.cli(module.Args, module.PRESETS)


@pytest.mark.parametrize("module", [ec, ep, eh])
def test_presets_set_the_papers_columns_and_flags_override_them(module, monkeypatch):
    assert {k: getattr(parse(module, [], monkeypatch), k) for k in NAV[module]} == NAV[module]
    d4rl = parse(module, ["--preset", "d4rl"], monkeypatch)
    assert d4rl.preset == "d4rl" and {k: getattr(d4rl, k) for k in D4RL[module]} == D4RL[module]
    assert d4rl.dataset == "data/d4rl/halfcheetah_medium-v2.hdf5,data/d4rl/halfcheetah_expert-v2.hdf5"
    name, value = next(iter(D4RL[module].items()))
    flag = "--" + name.replace("_", "-")
    for argv in (["--preset", "d4rl", flag, "7"], [flag, "7", "--preset=d4rl"]):  # order does not matter
        assert getattr(parse(module, argv, monkeypatch), name) == 7
    with pytest.raises(SystemExit):
        parse(module, ["--preset", "mujoco"], monkeypatch)


def test_help_shows_the_preset_and_its_defaults():
    run = lambda *argv: subprocess.run([sys.executable, str(ROOT / "empo_ppo.py"), *argv], capture_output=True,
                                       text=True, cwd=ROOT)
    plain, d4rl = run("--help"), run("--preset", "d4rl", "--help")
    assert plain.returncode == 0 and d4rl.returncode == 0
    assert "--preset {d4rl,nav}" in plain.stdout or "--preset {nav,d4rl}" in plain.stdout
    assert "(default: 200000)" in plain.stdout and "(default: 1500000)" in d4rl.stdout
