"""The `ipadapter-jax` command: its subcommands, their help, the one-line usage errors, and the
config names of `train --config`. In-process where it can be (a subprocess pays the imports)."""

import importlib
import importlib.util
import os
import runpy
import subprocess
import sys
import warnings

import pytest

import ipadapter_jax
from ipadapter_jax.cli import main as cli
from ipadapter_jax.configs import CONFIGS, config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exit_code(call) -> int:
  """What a command exits with: its return value, or argparse's SystemExit code."""
  try:
    return call()
  except SystemExit as e:
    return e.code


def _run(argv) -> int:
  return _exit_code(lambda: cli.main(argv))


def test_help_lists_every_command_in_one_line_each(capsys):
  assert _run(["--help"]) == 0
  lines = capsys.readouterr().out.splitlines()
  for name, (_, description) in cli.COMMANDS.items():
    assert [line for line in lines if line.split()[:1] == [name]] == [
      f"  {name:<{max(map(len, cli.COMMANDS))}}  {description}"
    ], name
  assert set(cli.COMMANDS) == {
    "train",
    "sample",
    "convert",
    "data",
    "evaluate",
    "toy",
    "tpu-compile",
  }


def test_python_dash_m_is_the_command_and_prints_the_version():
  """The real entry path, once: `python -m ipadapter_jax` from outside the checkout."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run(
    [sys.executable, "-m", "ipadapter_jax", "--version"],
    cwd="/",
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  ).stdout
  assert out.split()[:2] == ["ipadapter-jax", ipadapter_jax.__version__], out
  assert os.path.dirname(ipadapter_jax.__file__) in out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_prints_its_help(name, capsys):
  assert _run([name, "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: ipadapter-jax {name}"), out[:200]


@pytest.mark.parametrize(
  "argv",
  [[name, "--no_such_flag"] for name in cli.COMMANDS]
  + [
    ["convert", "inspect", "--no_such_flag"],
    ["data", "build", "--no_such_flag"],
    ["no_such_command"],
    [],
  ],
)
def test_a_bad_flag_is_one_error_line_and_exit_code_2(argv, capsys):
  assert _run(argv) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: ipadapter-jax"), err


@pytest.mark.parametrize(
  "flags, says",
  [
    (["--config", "no_such_config", "--workdir", "w"], ", ".join(CONFIGS)),  # the known names
    (["--config=no_such_file.py", "--workdir", "w"], ", ".join(CONFIGS)),
    (["--config", "sd15", "--workdir", "w", "--config.no_such_key=1"], "no_such_key"),
    (["--config", "sd15", "--workdir", "w", "--config.batch_size=many"], "many"),
    (["--config", "sd15"], "--workdir"),
    (["--config", "sd15", "--workdir", "w", "extra"], "extra"),
  ],
)
def test_train_usage_errors_are_one_line_before_anything_runs(
  flags, says, capsys, tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)
  assert _run(["train", *flags]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: ipadapter-jax train:") and says in err[0], err
  assert not os.listdir(tmp_path)  # no work directory begun


def test_a_broken_config_file_is_one_line(tmp_path, capsys):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  assert _run(["train", "--config", str(broken), "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "SyntaxError" in err[0], err


def test_config_names_are_the_files_of_the_root_doors():
  """Each name resolves to the module file that defines its config, and each file in the
  repository's configs/ serves exactly one name's get_config (the same function)."""
  for name, module in CONFIGS.items():
    assert config_file(name) == importlib.util.find_spec(module).origin, name
  assert config_file("no_such_config") is None
  doors = {}
  for file in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    spec = importlib.util.spec_from_file_location(
      f"door_{file[:-3]}", os.path.join(ROOT, "configs", file)
    )
    door = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(door)
    served = [
      name
      for name, module in CONFIGS.items()
      if importlib.import_module(module).get_config is door.get_config
    ]
    assert len(served) == 1, (file, served)
    assert f"--config {served[0]}" in open(os.path.join(ROOT, "configs", file)).read(), file
    doors[served[0]] = file
  assert sorted(doors) == sorted(CONFIGS)


def test_train_parses_a_name_and_overrides_into_the_named_config():
  """--config NAME loads that config, and --config.KEY=VALUE overrides still apply."""
  from ipadapter_jax.cli import train  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.configs import sd15_ip_adapter_plus  # pylint: disable=import-outside-toplevel

  config, workdir = train.parse(
    [
      "--config",
      "sd15_plus",
      "--workdir",
      "runs/x",
      "--config.batch_size=3",
      "--config.data.source=/d",
    ]
  )
  expected = sd15_ip_adapter_plus.get_config()
  expected.batch_size, expected.data.source = 3, "/d"
  assert config.to_dict() == expected.to_dict() and workdir == "runs/x"
  assert config.is_locked  # a misspelt key in the code that reads it fails loudly


DOORS = [
  "ipadapter_jax",
  *(f"ipadapter_jax.cli.{module}" for module, _ in cli.COMMANDS.values()),
  "ipadapter_jax.cli.main",
]


@pytest.mark.parametrize("module", DOORS)
def test_every_python_dash_m_door_prints_help(module, capsys, monkeypatch):
  """`python -m MODULE --help`, run as runpy runs it (a module without its __main__ guard
  printed nothing)."""
  monkeypatch.setattr(sys, "argv", [module, "--help"])
  code = "no exit"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
      code = e.code
  assert code == 0 and "usage: ipadapter-jax" in capsys.readouterr().out, (module, code)
