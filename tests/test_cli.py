"""Every command a user types, run as a subprocess the way README.md shows it.

train_net.py (train, --resume, --eval-only), demo/demo.py, tools/demo_job.py (``make demo``) at
tiny size; ``--help`` of every tool; the errors for an unknown key, a missing config file and
a missing weights file; detectron2's environment report (the set-up's stub extension); and
SOLVER.REFERENCE_WORLD_SIZE scaling, checked in process for 1, 2 and 4 workers.

One module-scoped training run is shared by the train / resume / eval / demo tests.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH_CFG = "configs/synthetic/boxinst_R18_synth.yaml"
COCO_CFG = "configs/coco/instance-segmentation/boxinst_R50_bs16_50ep.yaml"
SIM_CFG = "configs/synthetic/sim_R18_synth.yaml"
TIMEOUT = 300  # seconds per command: a shared 2-core machine can be slow, a hang must not be endless

# 64 px images, 16 train / 6 val synthetic images, R18, 1 encoder layer, 4 decoder layers, 8 queries
TINY_MODEL = {
    "DATASETS.SYNTHETIC.NUM_TRAIN": 16,
    "DATASETS.SYNTHETIC.NUM_VAL": 6,
    "INPUT.IMAGE_SIZE": 64,
    "INPUT.MIN_SIZE_TEST": 64,
    "INPUT.MAX_SIZE_TEST": 64,
    "MODEL.RESNETS.DEPTH": 18,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 1,
    "MODEL.MASK_FORMER.DEC_LAYERS": 4,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 8,
    "MODEL.DEVICE": "cpu",
    "DATALOADER.NUM_WORKERS": 0,
}
TINY_TRAIN = {
    "SOLVER.IMS_PER_BATCH": 2,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 256,
    "SOLVER.WARMUP_ITERS": 0,
    "SOLVER.STEPS": "(1000,)",
    "MODEL.BOXSUP.PAIRWISE_WARMUP_ITERS": 4,
    "MODEL.BACKBONE_PRETRAIN.ENABLED": False,  # tested in test_backbone_pretrain.py
    "TEST.EVAL_PERIOD": 0,  # evaluation once, after the last iteration
}


def opts(**kv):
    out = []
    for k, v in kv.items():
        out += [k, str(v)]
    return out


def tiny(data_root, out_dir=None, train=True, **extra):
    kv = dict(TINY_MODEL, **{"DATASETS.SYNTHETIC.ROOT": str(data_root)})
    if train:
        kv.update(TINY_TRAIN)
    if out_dir is not None:
        kv["OUTPUT_DIR"] = str(out_dir)
    kv.update(extra)
    return opts(**kv)


def run(argv, cache_dir, timeout=TIMEOUT):
    """``python <argv>`` from the repository root; returns (exit status, stdout + stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MASK2FORMER_SIM_CACHE=str(cache_dir))
    p = subprocess.run([sys.executable] + list(argv), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def copypaste_results(text):
    """{task: {metric: value}} from detectron2's print_csv_format lines ("copypaste: ...")."""
    rows = [line.split("copypaste: ", 1)[1].strip() for line in text.splitlines() if "copypaste: " in line]
    results = {}
    i = 0
    while i < len(rows):
        if rows[i].startswith("Task: ") and i + 2 < len(rows):
            keys, values = rows[i + 1].split(","), rows[i + 2].split(",")
            results[rows[i][len("Task: "):]] = dict(zip(keys, (float(v) for v in values)))
            i += 3
        else:
            i += 1
    return results


def training_iterations(metrics_lines):
    return [r["iteration"] for r in metrics_lines if "total_loss" in r]


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def work(module_tmp):
    """Synthetic data, cache and outputs of this module's commands."""
    base = module_tmp
    return {"data": base / "data", "cache": base / "cache", "base": base}


# ---------------------------------------------------------------------------------------------
# commands that answer at once: --help and argument / config errors (run concurrently)
# ---------------------------------------------------------------------------------------------

HELP_CASES = {os.path.relpath(p, ROOT): [os.path.relpath(p, ROOT), "--help"]
              for p in sorted(glob.glob(os.path.join(ROOT, "tools", "*.py")))}
HELP_CASES.update({
    "train_net.py": ["train_net.py", "--help"],
    "demo/demo.py": ["demo/demo.py", "--help"],
    "-m mask2former_sim.engine.backbone_pretrain": ["-m", "mask2former_sim.engine.backbone_pretrain", "--help"],
    "-m mask2former_sim.data.synthetic": ["-m", "mask2former_sim.data.synthetic", "--help"],
})
MISSING_WEIGHTS = "no_such_dir/model_missing.pth"
ERROR_CASES = {
    # name: (argv, what the message must name); more cases in process below
    "unknown key": (
        ["train_net.py", "--config-file", SYNTH_CFG, "MODEL.DEVICE", "cpu", "MODEL.NOT_A_KEY", "1"], ["MODEL.NOT_A_KEY"]),
    "missing config file": (
        ["train_net.py", "--config-file", "configs/no_such_config.yaml", "MODEL.DEVICE", "cpu"],
        ["configs/no_such_config.yaml"]),
    "missing weights": (
        ["train_net.py", "--config-file", SYNTH_CFG, "--eval-only", "MODEL.WEIGHTS", MISSING_WEIGHTS,
         "MODEL.DEVICE", "cpu"], [MISSING_WEIGHTS, "MODEL.WEIGHTS"]),
}


# Runs each `python <argv>` of a json list in its own process, forked from this interpreter
# once it has imported torch (3 of the 6 s that every tool spends importing, here paid once).
# detectron2 and the project are NOT preloaded: each tool imports them itself, in its own order,
# so a script that forgets the compat shim still fails. Prints {key: [exit status, output]}.
FORK_RUNNER = r"""
import json, os, runpy, sys, tempfile, traceback
import torch, torchvision  # noqa: F401
root, jobs, parallel = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
results, running = {}, {}

def reap():
    pid, status = os.wait()
    key, path = running.pop(pid)
    with open(path, errors="replace") as f:
        results[key] = [os.waitstatus_to_exitcode(status), f.read()]
    os.remove(path)

for key, argv in jobs:
    while len(running) >= parallel:
        reap()
    fd, path = tempfile.mkstemp(suffix=".log")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if argv[0] == "-m":  # python -m module args: sys.path[0] is the working directory
                sys.argv, sys.path[0] = [argv[1]] + argv[2:], root
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:  # python script args: sys.path[0] is the script's directory
                script = os.path.join(root, argv[0])
                sys.argv, sys.path[0] = list(argv), os.path.dirname(script)
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(fd)
    running[pid] = (key, path)
while running:
    reap()
print(json.dumps(results))
"""


def run_forked(commands, cache_dir):
    """{key: (exit status, output)} of ``python <argv>`` for each key -> argv (see FORK_RUNNER)."""
    rc, out = run(["-c", FORK_RUNNER, ROOT, json.dumps(sorted(commands.items())), "2"], cache_dir)
    assert rc == 0, out[-3000:]
    return {k: tuple(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()}


@pytest.fixture(scope="module")
def quick(request, work):
    """Starts the --help commands (forked, see FORK_RUNNER) and the error commands (plain
    subprocesses) of the tests selected in this run, all at once; {case: future of (rc, output)}."""
    wanted = {item.callspec.params.get("case") for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")}
    helps = {k: v for k, v in HELP_CASES.items() if k in wanted}
    pool = ThreadPoolExecutor(max_workers=4)
    futures = {("error", k): pool.submit(run, v[0], work["cache"]) for k, v in ERROR_CASES.items() if k in wanted}
    if helps:
        forked = pool.submit(run_forked, helps, work["cache"])
        for k in helps:
            futures[("help", k)] = pool.submit(lambda k=k: forked.result()[k])
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("case", sorted(HELP_CASES))
def test_every_python_tool_answers_help(quick, case):
    rc, out = quick[("help", case)].result(timeout=TIMEOUT)
    assert rc == 0, out[-3000:]
    assert "usage:" in out, out[-3000:]


@pytest.mark.parametrize("script", sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tools", "*.sh"))))
def test_every_shell_tool_answers_help(script):
    p = subprocess.run(["bash", script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert script in p.stdout  # the usage names the script
    assert "[setup]" not in p.stdout  # --help does not run the set-up


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_user_errors_exit_nonzero_naming_the_culprit(quick, case):
    rc, out = quick[("error", case)].result(timeout=TIMEOUT)
    assert rc != 0, out[-3000:]
    for name in ERROR_CASES[case][1]:
        assert name in out, (name, out[-3000:])
    assert "Traceback" not in out, out[-3000:]  # a message, not a crash


def load_script(relpath):
    """A script of the repository as a module (its main() is then callable in this process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_" + re.sub(r"\W", "_", relpath), os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def preflight(argv):
    """train_net.py's check of its arguments, in process: the message it exits with, or None."""
    from detectron2.engine import default_argument_parser

    train_net = load_script("train_net.py")
    try:
        train_net.check_args(default_argument_parser().parse_args(argv))
    except SystemExit as e:
        assert e.code == 2
        return True
    return None


@pytest.mark.parametrize("case", [
    "yaml unknown key", "no config file", "bad value type", "odd overrides", "missing weights, training",
    "eval-only without weights", "missing _BASE_",
])
def test_train_net_preflight_names_the_culprit(case, tmp_path, capsys, in_root):
    synth = os.path.join(ROOT, SYNTH_CFG)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"_BASE_: {synth}\nMODEL:\n  YAML_TYPO_KEY: 3\n")
    no_base = tmp_path / "no_base.yaml"
    no_base.write_text("_BASE_: not_there/Base.yaml\n")
    argv, names = {
        "yaml unknown key": (["--config-file", str(bad_yaml)], ["MODEL.YAML_TYPO_KEY", str(bad_yaml)]),
        "no config file": (["MODEL.DEVICE", "cpu"], ["--config-file"]),
        "bad value type": (["--config-file", synth, "SOLVER.MAX_ITER", "many"], ["SOLVER.MAX_ITER", "many"]),
        "odd overrides": (["--config-file", synth, "SOLVER.MAX_ITER"], ["SOLVER.MAX_ITER", "pairs"]),
        "missing weights, training": (["--config-file", synth, "MODEL.BACKBONE_PRETRAIN.ENABLED", "False",
                                       "MODEL.WEIGHTS", MISSING_WEIGHTS], ["MODEL.WEIGHTS", MISSING_WEIGHTS]),
        "eval-only without weights": (["--config-file", synth, "--eval-only", "OUTPUT_DIR", str(tmp_path)],
                                      ["--eval-only", "MODEL.WEIGHTS"]),
        "missing _BASE_": (["--config-file", str(no_base)], ["not_there/Base.yaml"]),
    }[case]
    assert preflight(argv), case
    err = capsys.readouterr().err
    for name in names:
        assert name in err, (name, err)


def test_train_net_preflight_accepts_what_it_should(tmp_path, in_root):
    synth = os.path.join(ROOT, SYNTH_CFG)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    assert preflight(["--config-file", synth, "--eval-only", "MODEL.WEIGHTS", str(weights)]) is None
    assert preflight(["--config-file", synth]) is None
    # with --resume and a checkpoint in OUTPUT_DIR, MODEL.WEIGHTS is not used and not checked
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    assert preflight(["--config-file", synth, "--resume", "MODEL.WEIGHTS", MISSING_WEIGHTS,
                      "MODEL.BACKBONE_PRETRAIN.ENABLED", "False", "OUTPUT_DIR", str(tmp_path)]) is None
    assert preflight(["--config-file", synth, "--eval-only", "--resume", "OUTPUT_DIR", str(tmp_path)]) is None


def test_demo_and_demo_job_name_missing_files(tmp_path, capsys, in_root):
    demo = load_script("demo/demo.py")
    with pytest.raises(SystemExit, match=re.escape(MISSING_WEIGHTS)):
        demo.main(["--config-file", SYNTH_CFG, "--input", "x.png", "--output", str(tmp_path / "o"),
                   "--opts", "MODEL.WEIGHTS", MISSING_WEIGHTS])
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    with pytest.raises(SystemExit, match="no_such_image.png"):
        demo.main(["--config-file", SYNTH_CFG, "--input", "no_such_image.png", "--output", str(tmp_path / "o"),
                   "--opts", "MODEL.WEIGHTS", str(weights)])
    assert not os.path.exists(tmp_path / "o")
    demo_job = load_script("tools/demo_job.py")
    with pytest.raises(SystemExit) as e:
        demo_job.main(["--config-file", "configs/no_such_config.yaml", "--output-dir", str(tmp_path / "dj")])
    assert e.value.code == 2 and "configs/no_such_config.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo_job.main(["--output-dir", str(tmp_path / "dj"), "MODEL.NOT_A_KEY", "1"])
    assert "MODEL.NOT_A_KEY" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# detectron2's environment report (tools/setup_env.sh's stub extension)
# ---------------------------------------------------------------------------------------------

def test_detectron2_environment_report_works():
    import detectron2._C as ext
    from detectron2.utils.collect_env import collect_env_info

    info = collect_env_info()
    compiler = re.search(r"^Compiler\s+(\S.*)$", info, re.M)
    assert compiler and compiler.group(1).strip(), info[:2000]
    assert re.search(r"^CUDA compiler\s+\S", info, re.M), info[:2000]
    if "tools/setup_env.sh" in (ext.__doc__ or ""):  # our stub (a full source build is left alone)
        assert ext.has_cuda() is False
        assert ext.get_cuda_version() == "not built with CUDA ops"
        assert re.fullmatch(r"(GCC|clang|MSVC) [0-9.]+", ext.get_compiler_version())
        with pytest.raises(AttributeError, match="box_iou_rotated.*without its C\\+\\+/CUDA ops"):
            ext.box_iou_rotated  # noqa: B018


# ---------------------------------------------------------------------------------------------
# train_net.py: train, --resume, --eval-only; demo/demo.py; tools/demo_job.py
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(work):
    """``train_net.py --config-file <synthetic> ...`` for 2 iterations, checkpoint period 2."""
    out_dir = work["base"] / "train"
    rc, log = run(["train_net.py", "--config-file", SYNTH_CFG]
                  + tiny(work["data"], out_dir, **{"SOLVER.MAX_ITER": 2, "SOLVER.CHECKPOINT_PERIOD": 2}),
                  work["cache"])
    assert rc == 0, log[-5000:]
    return {"out": out_dir, "log": log}


@pytest.mark.slow
def test_train_net_trains_and_writes_its_outputs(trained):
    out, log = trained["out"], trained["log"]
    for name in ("model_final.pth", "last_checkpoint", "metrics.json", "log.txt", "config.yaml"):
        assert os.path.isfile(out / name), name
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["iteration"] == 1
    assert training_iterations(read_metrics(out / "metrics.json")) == [1]  # 0-based: the 2nd iteration
    assert "Starting training from iteration 0" in log
    # the environment report ran (default_setup) and our own loggers reach the log
    assert re.search(r"^Compiler\s+\S", log, re.M), log[:3000]
    assert "mask2former_sim.data" in log
    # the evaluation after the last iteration
    results = copypaste_results(log)
    assert set(results) == {"bbox", "segm"}, results


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(trained, work, drop_run):
    out = work["base"] / "resumed"
    shutil.copytree(trained["out"], out)
    before = len(read_metrics(out / "metrics.json"))
    rc, log = run(["train_net.py", "--config-file", SYNTH_CFG, "--resume"]
                  + tiny(work["data"], out, **{"SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 2}),
                  work["cache"])
    assert rc == 0, log[-5000:]
    assert "Starting training from iteration 2" in log, log[-5000:]
    assert "Starting training from iteration 0" not in log
    assert "Resuming the data stream at iteration 2" in log
    new = read_metrics(out / "metrics.json")[before:]
    assert training_iterations(new) == [3], new  # iterations 3..4 (0-based 2..3), written at the last one
    assert all(r["iteration"] >= 2 for r in new), new
    saved = re.findall(r"Saving checkpoint to \S*?(model_\w+\.pth)", log)
    assert saved == ["model_0000003.pth", "model_final.pth"], saved
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["iteration"] == 3
    drop_run(out)


@pytest.mark.slow
def test_nonfinite_loss_names_the_term_its_output_and_the_iteration(work):
    out = work["base"] / "nonfinite"
    # 1e999 reads as inf: every projection term becomes inf at the first step
    rc, log = run(["train_net.py", "--config-file", SYNTH_CFG]
                  + tiny(work["data"], out, **{"SOLVER.MAX_ITER": 3, "MODEL.BOXSUP.PROJECTION_WEIGHT": "1e999"}),
                  work["cache"])
    assert rc != 0, log[-3000:]
    assert "non-finite loss at iteration 0: loss_proj = inf at decoder output aux_0" in log, log[-3000:]
    assert "loss_proj = inf at the final decoder output" in log
    assert "no checkpoint was written yet" in log
    assert not (out / "last_checkpoint").exists()


@pytest.fixture(scope="module")
def sim_trained(work):
    """``train_net.py`` with the SIM config for 3 iterations, the pseudo-mask loss on from the 2nd."""
    out = work["base"] / "sim"
    # tau_l = tau_h = 0.5 on the instance map: an untrained teacher's every in-box cell is a target
    sim = {"SOLVER.MAX_ITER": 3, "MODEL.SIM.WARMUP_ITERS": 1, "MODEL.SIM.MODULATION": 1.0,
           "MODEL.SIM.LOW_THRESH": 0.5, "MODEL.SIM.HIGH_THRESH": 0.5}
    rc, log = run(["train_net.py", "--config-file", SIM_CFG] + tiny(work["data"], out, **sim), work["cache"])
    assert rc == 0, log[-5000:]
    return out


@pytest.mark.slow
def test_sim_trains_from_train_net_and_the_pseudo_mask_tools_run_on_it(sim_trained, work):
    """The README's SIM commands: train_net.py with the SIM config, then eval_pseudo_masks.py,
    visualize_pseudo_masks.py and diagnose_pseudo_masks.py on its checkpoint (subprocesses)."""
    out = sim_trained
    rows = read_metrics(out / "metrics.json")
    assert any(r.get("loss_pseudo_bce", 0) > 0 for r in rows), rows
    assert 0.0 <= [r for r in rows if "pseudo_mask/miou_final" in r][-1]["pseudo_mask/miou_final"] <= 1.0
    # tau_l = tau_h: every in-box cell is a positive or a negative of the pseudo loss (logged shares)
    last = [r for r in rows if "sim/pseudo_neg_fraction" in r][-1]
    assert last["sim/pseudo_pos_fraction"] + last["sim/pseudo_neg_fraction"] == pytest.approx(1.0, abs=1e-3), last
    assert last["sim/proto_pixels"] >= 0
    weights = str(out / "model_final.pth")
    common = ["--config-file", SIM_CFG, "--weights", weights]
    rc, log = run(["tools/eval_pseudo_masks.py", *common, "--out", str(out / "pq.json")]
                  + tiny(work["data"], train=False), work["cache"])
    assert rc == 0 and "| semantic |" in log, log[-3000:]
    assert json.load(open(out / "pq.json"))["teacher"]
    rc, log = run(["tools/visualize_pseudo_masks.py", *common, "--output", str(out / "panels"), "--images", "2"]
                  + tiny(work["data"], train=False), work["cache"])
    assert rc == 0 and glob.glob(str(out / "panels" / "*.png")), log[-3000:]
    rc, log = run(["tools/diagnose_pseudo_masks.py", *common] + tiny(work["data"], train=False), work["cache"])
    assert rc == 0 and "| all |" in log and "AUC S" in log, log[-3000:]


@pytest.mark.slow
def test_compare_runs_tables_plots_and_missing_files(trained, sim_trained, work, tmp_path):
    """tools/compare_runs.py on the box-only and the SIM tiny runs: AP read back from their
    metrics.json, per-class deltas, exactly the differing keys, valid PNGs; a run without
    metrics.json is named."""
    box, sim = trained["out"], sim_trained
    out = tmp_path / "cmp"
    rc, log = run(["tools/compare_runs.py", str(sim), "--baseline", str(box), "--out", str(out)], work["cache"])
    assert rc == 0, log[-3000:]
    text = (out / "comparison.md").read_text()
    finals = {p: [r for r in read_metrics(p / "metrics.json") if "segm/AP" in r][-1] for p in (box, sim)}
    for p, name in ((box, "train"), (sim, "sim")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == f"{finals[p]['segm/AP']:.1f}" and cells[10] == f"{finals[p]['bbox/AP']:.1f}", row
        assert cells[11] == f"{finals[p]['segm/AP'] - finals[box]['segm/AP']:+.1f}", row
        assert cells[14] != "–", row  # peak memory from metrics.json
    assert "| sim | boxes, SIM |" in text and "| train | boxes (projection + pairwise) |" in text
    assert "## Per-class mask AP" in text and "circle" in text
    import yaml

    def flat(d, pre=""):
        out_ = {}
        for k, v in d.items():
            out_.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out_

    a, b = (flat(yaml.safe_load(open(p / "config.yaml"))) for p in (box, sim))
    expected = sorted(k for k in set(a) | set(b) if k != "OUTPUT_DIR" and a.get(k, "(unset)") != b.get(k, "(unset)"))
    listed = re.findall(r"^\| `([^`]+)` \|", text.split("## Config keys that differ")[1], re.M)
    assert listed == expected and "MODEL.SIM.ENABLED" in listed
    for png in ("losses.png", "per_class_delta.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    empty = tmp_path / "no_metrics"
    empty.mkdir()
    rc, log = run(["tools/compare_runs.py", str(empty), "--baseline", str(box), "--out", str(out)], work["cache"])
    assert rc != 0 and "no_metrics" in log and "metrics.json" in log, log[-2000:]
    assert "## Mean ± std over seeds" not in text  # no two runs differ in SEED alone

    # a second seed of the box-only run (its config differs in SEED and one ignored key only)
    seed7 = tmp_path / "train_seed7"
    shutil.copytree(box, seed7)
    cfg7 = yaml.safe_load(open(seed7 / "config.yaml"))
    cfg7["SEED"], cfg7["TEST"]["EVAL_PERIOD"] = 7, 123
    yaml.safe_dump(cfg7, open(seed7 / "config.yaml", "w"))
    rows7 = read_metrics(seed7 / "metrics.json")
    for r in rows7:
        if "segm/AP" in r:
            r["segm/AP"] = finals[box]["segm/AP"] + 3.0
    (seed7 / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows7))
    rc, log = run(["tools/compare_runs.py", str(sim), str(seed7), "--baseline", str(box), "--out", str(out),
                   "--group-ignore", "TEST.EVAL_PERIOD"], work["cache"])
    assert rc == 0, log[-3000:]
    text = (out / "comparison.md").read_text()
    row = next(line for line in text.split("## Mean ± std over seeds")[1].splitlines() if line.startswith("| train, train_seed7 |"))
    a0, a7 = finals[box]["segm/AP"], finals[box]["segm/AP"] + 3.0
    assert f"| {(a0 + a7) / 2:.1f} ± {abs(a7 - a0) / 2 ** 0.5:.1f} |" in row, row
    assert f"| {box_seed(box)}, 7 |" in row and f"{a7:.1f}" in row, row
    assert "| sim" not in text.split("## Mean ± std over seeds")[1].split("## Per-class")[0]  # SIM has one seed


def box_seed(run_dir):
    import yaml

    return yaml.safe_load(open(run_dir / "config.yaml"))["SEED"]


@pytest.mark.slow
def test_benchmark_synthetic_seeds_give_mean_and_std(work, drop_run):
    out = work["base"] / "bench"
    rc, log = run(["tools/benchmark_synthetic.py", "--configs", SYNTH_CFG, "--out", str(out), "--seeds", "0", "1",
                   "--opts"] + tiny(work["data"], **{"SOLVER.MAX_ITER": 2}), work["cache"], timeout=600)
    assert rc == 0, log[-5000:]
    aps = []
    for seed in (0, 1):
        summary = json.load(open(out / "boxinst_R18_synth" / f"seed{seed}" / "demo_summary.json"))
        aps.append(summary["results"]["segm"]["AP"])
    row = next(line for line in (out / "table.md").read_text().splitlines() if line.startswith("| boxinst_R18_synth |"))
    mean, std = sum(aps) / 2, abs(aps[0] - aps[1]) / 2 ** 0.5
    assert f"| {mean:.1f} ± {std:.1f} |" in row, row
    assert f"0: {aps[0]:.1f}, 1: {aps[1]:.1f}" in row, row
    drop_run(out)


@pytest.mark.slow
def test_benchmark_sim_synthetic_rows_continue_from_the_shared_warmup(work, drop_run):
    out = work["base"] / "simbench"
    extra = tiny(work["data"], **{"SOLVER.MAX_ITER": 3, "MODEL.SIM.WARMUP_ITERS": 2, "DATALOADER.NUM_WORKERS": 0})
    env = dict(os.environ, OMP_NUM_THREADS="1", MASK2FORMER_SIM_CACHE=str(work["cache"]), PYTHON=sys.executable,
               EXTRA_OPTS=" ".join(extra))
    p = subprocess.run(["bash", "tools/benchmark_sim_synthetic.sh", str(out), "0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    text = (out / "seed0" / "cmp" / "comparison.md").read_text()
    for row in ("boxonly", "sim", "sim_paper_maps", "sim_beta0", "sim_beta1", "sim_gamma0"):
        assert f"| {row} |" in text, text
        log = (out / "seed0" / f"{row}.log").read_text()
        assert "Starting training from iteration 2" in log, log[-3000:]
    assert "`MODEL.SIM.MODULATION`" in text and "`MODEL.SIM.IOU_GAMMA`" in text and "`MODEL.SIM.ENABLED`" in text
    assert "`MODEL.SIM.PSEUDO_WEIGHT`" in text  # the paper-maps row at the lambda_1 it was measured with
    # every row starts from a hard link of the warm-up checkpoint: the rows' own saves (temporary
    # file renamed over the name) left the warm-up's file as it was
    warm = torch.load(out / "seed0" / "warmup" / "model_final.pth", map_location="cpu", weights_only=True)
    assert warm["iteration"] == 1, warm["iteration"]
    drop_run(out)


@pytest.mark.slow
def test_eval_only_prints_segm_and_bbox_ap(trained, work):
    weights = str(trained["out"] / "model_final.pth")
    # the README command on the synthetic config (backbone pretraining left on: eval-only never runs it)
    rc, log = run(["train_net.py", "--config-file", SYNTH_CFG, "--eval-only", "MODEL.WEIGHTS", weights]
                  + tiny(work["data"], work["base"] / "eval", train=False), work["cache"])
    assert rc == 0, log[-5000:]
    results = copypaste_results(log)
    assert set(results) == {"bbox", "segm"}, log[-3000:]
    for task in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75"} <= set(results[task])
        assert 0.0 <= results[task]["AP"] <= 100.0
    assert "Starting training" not in log
    assert "Pretraining the backbone" not in log


@pytest.mark.slow
def test_demo_writes_overlays(trained, work):
    from PIL import Image

    images = sorted(glob.glob(str(work["data"] / "val" / "**" / "*.png"), recursive=True))[:2]
    assert len(images) == 2
    out = work["base"] / "demo_out"
    rc, log = run(["demo/demo.py", "--config-file", SYNTH_CFG, "--input", *images, "--output", str(out),
                   "--confidence-threshold", "0.0", "--opts", "MODEL.WEIGHTS", str(trained["out"] / "model_final.pth")]
                  + tiny(work["data"], train=False), work["cache"])
    assert rc == 0, log[-5000:]
    written = sorted(glob.glob(str(out / "*.png")))
    assert [os.path.basename(p) for p in written] == [os.path.basename(p) for p in images]
    for src, dst in zip(images, written):
        with Image.open(src) as a, Image.open(dst) as b:
            assert b.size[0] * a.size[1] == b.size[1] * a.size[0] and b.size[0] >= a.size[0]  # scaled copy


@pytest.mark.slow
def test_demo_job_runs_at_tiny_size(work, drop_run):
    """``make demo``'s command (SIM) with KEY VALUE overrides: summary, overlays, AP, pseudo-mask
    quality and panels; the pseudo-mask loss is on from the second step."""
    out = work["base"] / "demo_job"
    rc, log = run(["tools/demo_job.py", "--output-dir", str(out), "--num-overlays", "2", "--num-panels", "3"]
                  # tau_l = tau_h = 0.5 on the instance map: an untrained teacher's every in-box cell is a target
                  + tiny(work["data"], **{"SOLVER.MAX_ITER": 3, "MODEL.SIM.WARMUP_ITERS": 1, "MODEL.SIM.MODULATION": 1.0,
                                          "MODEL.SIM.LOW_THRESH": 0.5, "MODEL.SIM.HIGH_THRESH": 0.5}), work["cache"])
    assert rc == 0, log[-5000:]
    assert "=== mask2former-sim demo job ===" in log
    assert "training          SIM, 3 iterations" in log
    with open(out / "metrics.json") as f:
        last = [json.loads(line) for line in f if "loss_pseudo_bce" in line][-1]
    assert last["loss_pseudo_bce"] > 0, last
    assert 0.0 <= json.load(open(out / "demo_summary.json"))["pseudo_mask_quality"]["pseudo_mask/miou_final"] <= 1.0
    panels = json.load(open(out / "demo_summary.json"))["pseudo_mask_panels"]
    assert len(panels) == 3 and all(os.path.getsize(p) > 1000 for p in panels)
    with open(out / "demo_summary.json") as f:
        summary = json.load(f)
    assert summary["iterations"] == 3 and summary["images_per_batch"] == 2
    assert {"segm", "bbox"} <= set(summary["results"])
    assert 0.0 <= summary["results"]["segm"]["AP"] <= 100.0
    assert len(summary["overlays"]) == 2
    assert all(os.path.isfile(p) and os.path.dirname(p) == str(out / "overlays") for p in summary["overlays"])
    assert os.path.isfile(out / "model_final.pth") and os.path.isfile(out / "metrics.json")
    drop_run(out)


# ---------------------------------------------------------------------------------------------
# SOLVER.REFERENCE_WORLD_SIZE: the bs16 recipe on 1, 2 or 4 GPUs (no processes launched)
# ---------------------------------------------------------------------------------------------

def coco_recipe(reference_world_size):
    from mask2former_sim.engine.setup import build_cfg

    return build_cfg(os.path.join(ROOT, COCO_CFG), ["SOLVER.REFERENCE_WORLD_SIZE", str(reference_world_size)])


# hand-computed for the 8 x 2-image recipe (IMS_PER_BATCH 16, BASE_LR 1e-4, MAX_ITER 368750,
# STEPS (327778, 355092), WARMUP_ITERS 10, CHECKPOINT_PERIOD 5000, EVAL_PERIOD 5000,
# PAIRWISE_WARMUP_ITERS 10000): everything counted in iterations x 8/n, batch and LR x n/8
SCALED = {
    1: dict(batch=2, lr=1.25e-5, max_iter=2950000, steps=(2622224, 2840736), warmup=80, period=40000, pairwise=80000),
    2: dict(batch=4, lr=2.5e-5, max_iter=1475000, steps=(1311112, 1420368), warmup=40, period=20000, pairwise=40000),
    4: dict(batch=8, lr=5e-5, max_iter=737500, steps=(655556, 710184), warmup=20, period=10000, pairwise=20000),
}


@pytest.mark.parametrize("gpus", sorted(SCALED))
def test_reference_world_size_scales_the_bs16_recipe(gpus):
    from mask2former_sim.engine.trainer import Trainer

    cfg = coco_recipe(8)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (16, 1e-4, 368750)
    scaled = Trainer.auto_scale_workers(cfg, gpus)
    e = SCALED[gpus]
    s = scaled.SOLVER
    assert s.IMS_PER_BATCH == e["batch"] and s.IMS_PER_BATCH // gpus == 2  # 2 images per GPU, as in the recipe
    assert s.BASE_LR == pytest.approx(e["lr"])
    assert s.MAX_ITER == e["max_iter"]
    assert tuple(s.STEPS) == e["steps"]
    assert s.WARMUP_ITERS == e["warmup"]
    assert s.CHECKPOINT_PERIOD == e["period"] and scaled.TEST.EVAL_PERIOD == e["period"]
    assert s.REFERENCE_WORLD_SIZE == gpus
    assert scaled.MODEL.BOXSUP.PAIRWISE_WARMUP_ITERS == e["pairwise"]
    assert scaled.MODEL.SIM.WARMUP_ITERS == e["pairwise"]
    assert scaled.is_frozen()
    # the recipe itself is untouched; at its own world size nothing changes
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.MAX_ITER == 368750
    assert Trainer.auto_scale_workers(cfg, 8) is cfg
    unset = coco_recipe(0)  # REFERENCE_WORLD_SIZE 0 (the default): never scaled
    assert Trainer.auto_scale_workers(unset, gpus) is unset


def test_trainer_parts_see_the_scaled_cfg(work):
    """REFERENCE_WORLD_SIZE 2 in one process (s = 1/2): the trainer's cfg, loader, LR schedule,
    checkpoint and eval periods and the criterion's pairwise warm-up are all the scaled ones."""
    from detectron2.engine import hooks

    from mask2former_sim.data.registry import register_datasets_for
    from mask2former_sim.engine.setup import build_cfg
    from mask2former_sim.engine.trainer import Trainer

    cfg = build_cfg(os.path.join(ROOT, SYNTH_CFG), tiny(work["data"], work["base"] / "scaled", **{
        "SOLVER.IMS_PER_BATCH": 4, "SOLVER.REFERENCE_WORLD_SIZE": 2, "SOLVER.BASE_LR": 0.001,
        "SOLVER.MAX_ITER": 3, "SOLVER.STEPS": "(2,)", "SOLVER.CHECKPOINT_PERIOD": 2, "TEST.EVAL_PERIOD": 2,
        "MODEL.BOXSUP.PAIRWISE_WARMUP_ITERS": 5}))
    register_datasets_for(cfg)
    trainer = Trainer(cfg)
    c = trainer.cfg
    assert (c.SOLVER.IMS_PER_BATCH, c.SOLVER.MAX_ITER, tuple(c.SOLVER.STEPS)) == (2, 6, (4,))
    assert c.SOLVER.BASE_LR == pytest.approx(0.0005)
    assert trainer.max_iter == 6
    assert trainer.data_loader.batch_size == 2
    assert len(next(iter(trainer.data_loader))) == 2
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} <= {0.0005, 0.0005 * c.SOLVER.BACKBONE_MULTIPLIER}
    assert trainer.scheduler._max_iter == 6
    multiplier = trainer.scheduler._multiplier
    assert multiplier(3.5 / 6) == pytest.approx(1.0) and multiplier(4.5 / 6) == pytest.approx(c.SOLVER.GAMMA)
    checkpointers = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    evals = [h for h in trainer._hooks if isinstance(h, hooks.EvalHook)]
    assert [h.period for h in checkpointers] == [4] and [h._period for h in evals] == [4]
    assert trainer.model.criterion.pairwise_warmup_iters == 10


@pytest.mark.slow
def test_compare_predictions_writes_side_by_side_pngs_and_names_a_bad_run(trained, sim_trained, work, tmp_path):
    """tools/compare_predictions.py on the box-only and the SIM tiny runs: one PNG per chosen image,
    GT + one panel per run side by side, GT colours from the shared palette; a run directory
    without config.yaml is an error naming it, not a traceback."""
    import numpy as np
    from PIL import Image

    from mask2former_sim.engine.visualize import INSTANCE_PALETTE

    panel = 200
    out = tmp_path / "cmp_pred"
    rc, log = run(["tools/compare_predictions.py", str(trained["out"]), str(sim_trained), "--out", str(out),
                   "--images", "2", "--panel-size", str(panel), "--opts"] + tiny(work["data"], train=False),
                  work["cache"])
    assert rc == 0, log[-3000:]
    written = sorted(glob.glob(str(out / "*.png")))
    assert len(written) == 2, (written, log[-2000:])
    for path in written:
        assert path in log, (path, log[-2000:])  # the written paths are printed
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
        assert os.path.getsize(path) > 5000, path
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        width, height = rgb.size
        assert width >= 3 * panel and height >= panel, (path, rgb.size)  # GT + 2 runs in a row
        gt_panel = np.asarray(rgb)[:, :panel]
        assert (gt_panel == np.array(INSTANCE_PALETTE[0], dtype=np.uint8)).all(-1).any(), path  # 1st GT's colour
    no_config = tmp_path / "no_config_run"
    no_config.mkdir()
    rc, log = run(["tools/compare_predictions.py", str(trained["out"]), str(no_config), "--out", str(out)],
                  work["cache"])
    assert rc != 0, log[-2000:]
    assert "no_config_run" in log and "config.yaml" in log, log[-2000:]
    assert "Traceback" not in log, log[-2000:]


@pytest.mark.slow
def test_copy_paste_trains_from_train_net_and_visualize_copy_paste_draws_it(work, tmp_path, drop_run):
    """train_net.py with the copy-paste SIM config (every image receives a paste once the bank holds
    an entry; threshold 0.3 so that an untrained teacher's maps fill it): the copy-paste loss and
    the bank's size reach metrics.json; then tools/visualize_copy_paste.py on its checkpoint
    writes one valid PNG per image, and names a missing checkpoint without a traceback."""
    from PIL import Image

    cp_cfg = "configs/synthetic/sim_cp_R18_synth.yaml"
    out = work["base"] / "sim_cp"
    sim = {"SOLVER.MAX_ITER": 4, "MODEL.SIM.WARMUP_ITERS": 1, "MODEL.SIM.MODULATION": 1.0,
           "MODEL.SIM.LOW_THRESH": 0.5, "MODEL.SIM.HIGH_THRESH": 0.5,
           "MODEL.SIM.COPY_PASTE.PROB": 1.0, "MODEL.SIM.COPY_PASTE.MASK_THRESH": 0.3}
    rc, log = run(["train_net.py", "--config-file", cp_cfg] + tiny(work["data"], out, **sim), work["cache"])
    assert rc == 0, log[-5000:]
    rows = read_metrics(out / "metrics.json")
    assert any(r.get("loss_paste_ce", 0) > 0 for r in rows), rows
    # the sim/* scalars: every 20 iterations and at the last one
    assert [r for r in rows if "sim/bank_entries" in r][-1]["sim/bank_entries"] > 0, rows
    viz = tmp_path / "cp_panels"
    model_opts = {k: v for k, v in sim.items() if k.startswith("MODEL.SIM.")}
    common = ["tools/visualize_copy_paste.py", "--config-file", cp_cfg, "--output", str(viz),
              "--images", "2", "--steps", "2"]
    rc, log = run(common + ["--weights", str(out / "model_final.pth"), "--opts"]
                  + tiny(work["data"], train=False, **model_opts)
                  + opts(**{"SOLVER.IMS_PER_BATCH": 2, "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 256}),
                  work["cache"])
    assert rc == 0, log[-3000:]
    written = sorted(glob.glob(str(viz / "*.png")))
    assert len(written) == 2, (written, log[-2000:])
    for path in written:
        assert path in log, (path, log[-2000:])
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
        with Image.open(path) as img:
            width, height = img.size
        assert width > 2 * 384 and height > 384, (path, img.size)  # original and pasted side by side
    rc, log = run(common + ["--weights", MISSING_WEIGHTS], work["cache"])
    assert rc != 0 and MISSING_WEIGHTS in log and "--weights" in log, log[-2000:]
    assert "Traceback" not in log, log[-2000:]
    drop_run(out)


@pytest.mark.slow
def test_bank_and_step_memory_benchmarks_run_at_small_size(work):
    """The two memory benchmarks of README / docs/BENCHMARKS.md at small sizes: their markdown
    tables come out with numbers (the COCO-size figures are in docs/BENCHMARKS.md)."""
    rc, log = run(["tools/benchmark_bank_memory.py", "--size", "128", "--entries", "3", "--samples", "5"], work["cache"])
    assert rc == 0, log[-3000:]
    row = next(line for line in log.splitlines() if line.startswith("|") and re.search(r"\| \d+\.\d+ \|", line))
    assert float(re.search(r"\| (\d+\.\d+) \|", row).group(1)) > 0, row
    rc, log = run(["tools/benchmark_step_memory.py", "--size", "128", "--gts", "2", "--repeats", "1", "--threads", "1"],
                  work["cache"])
    assert rc == 0, log[-3000:]
    rows = [line for line in log.splitlines() if re.match(r"\| (boxonly|sim) \| 2 \| \d+ \|", line)]
    assert {r.split("|")[1].strip() for r in rows} == {"boxonly", "sim"}, log[-3000:]
