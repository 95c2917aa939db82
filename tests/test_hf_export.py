"""End to end: train a tiny hybrid from the debug config, export it, load it with transformers
(with flame, and as remote code in a process that cannot import flame), import it back for
continued pretraining, and reject bad input."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import flame.hf  # noqa: F401  (registers the Auto classes)
from flame.hf import convert
from flame.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(REPO, "train.py")
DEBUG_TOML = os.path.join(REPO, "train_configs", "debug.toml")
TEXT = "The history of the river begins with a small spring in the hills"


def run_train(config_path, *overrides, nproc=1):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, TRAIN_PY, "--config", config_path, *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def tiny_run_toml(path, dump_folder):
    """The debug config, shrunk: a gated DeltaNet / attention hybrid of two layers."""
    with open(path, "w") as f:
        f.write(textwrap.dedent(f"""\
            extends = "{DEBUG_TOML}"
            [job]
            dump_folder = "{dump_folder}"
            [model]
            mixer = "gated_deltanet"
            attn_layers = [1]
            dim = 64
            n_layers = 2
            n_heads = 2
            n_kv_heads = 1
            mlp_multiple_of = 16
            [training]
            steps = 2
            seq_len = 64
            local_batch_size = 2
            [checkpoint]
            interval = 2
            [data]
            num_workers = 0
            [metrics]
            log_freq = 1
            """))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(dump folder, checkpoint folder, export folder) of a 2-step run on 2 processes, whose
    checkpoint is sharded (FSDP2): the export reads it on the CPU in this one process."""
    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest -n: the workers of this session share one run (their base folders' parent)
        root = tmp_path_factory.getbasetemp().parent / "hf_run"
    else:
        root = tmp_path_factory.mktemp("hf_run")
    dump, export = root / "run", root / "export"
    ckpt = dump / "checkpoint" / "step-2"
    with FileLock(str(root) + ".lock"):
        if not export.is_dir():
            root.mkdir(exist_ok=True)
            run_train(str(tiny_run_toml(root / "tiny.toml", dump)), "--checkpoint.export_hf", "true", nproc=2)
            convert.to_hf(str(ckpt), str(export))
    assert sorted(n for n in os.listdir(ckpt) if n.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    return dump, ckpt, str(export)


def trainer_model(dump, ckpt):
    """The trainer's model, its weights read from the checkpoint by DCP itself."""
    import torch.distributed.checkpoint as dcp

    model_cfg, _ = convert.read_run_config(str(dump / "config.toml"))
    model = build_model(model_cfg).eval()
    state = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict(state)
    return model


def tokens(export):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export)(TEXT, return_tensors="pt").input_ids


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_export_has_the_trainers_logits(run):
    from transformers import AutoModelForCausalLM

    dump, ckpt, export = run
    assert sorted(os.listdir(export)) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", *convert.REMOTE_CODE])
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(hf).__module__ == "flame.hf.modeling_flame"
    ids = tokens(export)
    with torch.no_grad():
        expected = trainer_model(dump, ckpt)(ids)
        out = hf(ids, labels=ids)
    assert rel_err(out.logits, expected) < 1e-6
    ref_loss = torch.nn.functional.cross_entropy(expected[0, :-1], ids[0, 1:])
    assert abs(out.loss.item() - ref_loss.item()) < 1e-5


REMOTE_SCRIPT = r"""
import importlib.abc, json, os, sys
class BlockFlame(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flame" or name.startswith("flame."):
            raise ImportError("flame is blocked in this process")
sys.meta_path.insert(0, BlockFlame())
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != REPO]
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(EXPORT, trust_remote_code=True).eval()
ids = torch.tensor(IDS)
with torch.no_grad():
    logits = model(ids).logits
out = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
assert not any(m == "flame" or m.startswith("flame.") for m in sys.modules)
torch.save({"logits": logits, "generated": out, "module": type(model).__module__}, RESULT)
"""


def test_remote_code_without_flame(run, tmp_path):
    from transformers import AutoModelForCausalLM

    dump, ckpt, export = run
    ids = tokens(export)
    result = tmp_path / "result.pt"
    script = (f"REPO = {REPO!r}\nEXPORT = {export!r}\nIDS = {ids.tolist()!r}\nRESULT = {str(result)!r}\n"
              + REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # a fresh copy of the remote code
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(result)
    assert got["module"].startswith("transformers_modules")
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        expected = trainer_model(dump, ckpt)(ids)
    assert rel_err(got["logits"], expected) < 1e-5
    # greedy decoding through the remote code's recurrent cache = flame recomputing every prefix
    recomputed = hf.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(got["generated"], recomputed)


def read_safetensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, convert.WEIGHTS_FILE))


def test_round_trip_is_bit_identical_and_the_trainer_continues(run, tmp_path):
    dump, ckpt, export = run
    # HF (fp32) -> DCP -> HF
    step0 = tmp_path / "cont" / "checkpoint" / "step-0"
    convert.from_hf(export, str(step0))
    again = convert.to_hf(str(step0), str(tmp_path / "again"), config=str(dump / "config.toml"))
    a, b = read_safetensors(export), read_safetensors(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # a sharded export (tiny shards): index + several files, read back alike
    from transformers import AutoModelForCausalLM

    sharded = convert.to_hf(str(ckpt), str(tmp_path / "sharded"), max_shard_bytes=200_000)
    files = sorted(n for n in os.listdir(sharded) if n.endswith(".safetensors"))
    assert len(files) > 2 and convert.WEIGHTS_INDEX in os.listdir(sharded)
    assert all(torch.equal(v, a[convert.HF_PREFIX + k]) for k, v in convert.read_hf_model(sharded)[2].items())
    ids = tokens(export)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(sharded)(ids).logits,
                           AutoModelForCausalLM.from_pretrained(export)(ids).logits)
    # the trainer's end-of-training export (checkpoint.export_hf) wrote the same weights
    hook = str(dump / "hf" / "step-2")
    assert os.path.isfile(os.path.join(hook, "config.json"))
    c = read_safetensors(hook)
    assert all(torch.equal(a[k], c[k]) for k in a)
    with open(os.path.join(export, "config.json")) as f1, open(os.path.join(again, "config.json")) as f2:
        assert json.load(f1) == json.load(f2)
    # bf16 export -> DCP (fp32) -> bf16 export
    bf16 = convert.to_hf(str(ckpt), str(tmp_path / "bf16"), dtype="bfloat16")
    convert.from_hf(bf16, str(tmp_path / "bf16_dcp"))
    bf16_again = convert.to_hf(str(tmp_path / "bf16_dcp"), str(tmp_path / "bf16_again"), dtype="bfloat16",
                               config=str(dump / "config.toml"))
    c, d = read_safetensors(bf16), read_safetensors(bf16_again)
    assert c.keys() == a.keys()
    assert all(c[k].dtype == torch.bfloat16 and torch.equal(c[k], d[k]) for k in c)

    # The trainer starts from step-0 (another seed: its own init would differ everywhere), with
    # a negligible learning rate, so its step-1 weights are the imported ones.
    toml = tiny_run_toml(tmp_path / "cont.toml", tmp_path / "cont")
    run_train(str(toml), "--training.steps", "1", "--training.seed", "7", "--optimizer.lr", "1e-12")
    model_cfg, _ = convert.read_run_config(str(dump / "config.toml"))
    continued = convert.load_dcp_model_state(str(tmp_path / "cont" / "checkpoint" / "step-1"), model_cfg)
    for k, v in a.items():
        assert torch.allclose(continued[k[len(convert.HF_PREFIX):]], v, atol=1e-6, rtol=0), k

    # A step-0 that does not fit the run's model: one message naming the checkpoint and the key.
    shutil.rmtree(tmp_path / "cont" / "checkpoint" / "step-1")
    proc = subprocess.run([sys.executable, TRAIN_PY, "--config", str(toml), "--training.steps", "1",
                           "--model.dim", "96"], cwd=REPO, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert f"cannot load the checkpoint {step0}" in errors[0] and "model.dim = 64 (this run: 96)" in errors[0]


def test_bad_input_is_a_clear_error(run, tmp_path, monkeypatch):
    dump, ckpt, export = run
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no complete DCP checkpoint"):
        convert.to_hf(str(empty), str(tmp_path / "o1"))
    with pytest.raises(ValueError, match="step does not exist; complete checkpoints there: step-2"):
        convert.to_hf(str(ckpt.parent / "step-7"), str(tmp_path / "o2"))
    with pytest.raises(ValueError, match="point at one of them"):
        convert.to_hf(str(ckpt.parent), str(tmp_path / "o3"))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text((dump / "config.toml").read_text().replace("dim = 64", "dim = 96"))
    with pytest.raises(ValueError, match="does not match the run's \\[model\\] config"):
        convert.to_hf(str(ckpt), str(tmp_path / "o4"), config=str(wrong))
    with pytest.raises(ValueError, match="already exists"):
        convert.to_hf(str(ckpt), export)
    with pytest.raises(ValueError, match="--dtype"):
        convert.to_hf(str(ckpt), str(tmp_path / "o5"), dtype="int8")

    # weights that do not fit config.json
    bad = tmp_path / "bad_hf"
    bad.mkdir()
    for name in os.listdir(export):
        (bad / name).write_bytes(open(os.path.join(export, name), "rb").read())
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "mlp_hidden_dim": 48}))
    with pytest.raises(ValueError, match="weight\\(s\\) of another shape"):
        convert.from_hf(str(bad), str(tmp_path / "o6"))
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="not a flame model"):
        convert.from_hf(str(bad), str(tmp_path / "o7"))

    # an interrupted export leaves nothing that looks like a model
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "write_hf_folder", fail)
    with pytest.raises(RuntimeError):
        convert.to_hf(str(ckpt), str(tmp_path / "partial"))
    assert not [n for n in os.listdir(tmp_path) if "partial" in n]

    from flame.convert import main

    assert main(["to-hf", "--checkpoint", str(empty), "--out", str(tmp_path / "o8")]) == 2


LM_EVAL_TASK = """\
task: flame_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_evaluation_harness_runs_the_export(run, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # lm_eval's `hf` model needs it (the lm-eval[hf] extra)
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dump, ckpt, export = run
    docs = [{"question": "The river begins", "choices": [" in the hills", " at the sea"], "answer": 0},
            {"question": "A small", "choices": [" spring", " house", " of"], "answer": 1},
            {"question": "History of", "choices": [" the", " river"], "answer": 0}]
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(LM_EVAL_TASK.format(data=data))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={export},dtype=float32", tasks=["flame_tiny_choice"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")), device="cpu", batch_size=1)
    acc = results["results"]["flame_tiny_choice"]["acc,none"]

    # the same accuracy from our own log-likelihoods
    tok = AutoTokenizer.from_pretrained(export)
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    correct = 0
    for d in docs:
        scores = []
        for choice in d["choices"]:
            ctx, cont = tok(d["question"]).input_ids, tok(choice).input_ids
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = hf(ids).logits[0, len(ctx) - 1:-1].log_softmax(-1)
            scores.append(logp.gather(1, torch.tensor(cont)[:, None]).sum().item())
        correct += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    assert acc == pytest.approx(correct / len(docs))
