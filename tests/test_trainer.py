"""Tests of the trainer: the fixed harness (trainer/prepare.py) and the seed (trainer/train.py).

One prepared cache (cpu profile, the offline stdlib source, in a temp folder) is shared by
every test. Runs of train.py are real subprocesses in a run folder holding copies of both files,
as the launcher runs them."""

import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from services.contracts import PROGRESS_LINE

TRAINER = Path(__file__).resolve().parents[1] / "trainer"
SUMMARY_RE = re.compile(
    r"^---\n"
    r"val_bpb:\s+(?P<val_bpb>[\d.]+)\n"
    r"training_seconds:\s+(?P<training_seconds>[\d.]+)\n"
    r"total_seconds:\s+(?P<total_seconds>[\d.]+)\n"
    r"peak_vram_mb:\s+(?P<peak_vram_mb>[\d.]+)\n"
    r"mfu_percent:\s+(?P<mfu_percent>[\d.]+)\n"
    r"total_tokens_M:\s+(?P<total_tokens_M>[\d.]+)\n"
    r"num_steps:\s+(?P<num_steps>\d+)\n"
    r"num_params_M:\s+(?P<num_params_M>[\d.]+)\n"
    r"depth:\s+(?P<depth>\d+)\n?\Z",
    re.MULTILINE,
)


def trainer_env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTSHIFT_")}
    env.update(NIGHTSHIFT_CACHE=str(cache), NIGHTSHIFT_PROFILE="cpu", **extra)
    return env


def run_prepare(cache: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "prepare.py", *args],
        cwd=TRAINER,
        text=True,
        capture_output=True,
        env=trainer_env(cache, **extra),
        timeout=300,
    )


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nightshift-cache")
    proc = run_prepare(root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


@pytest.fixture(scope="session")
def prep(cache: Path) -> Iterator[ModuleType]:
    """trainer/prepare.py imported against the shared cache (it reads the environment once)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in trainer_env(cache).items():
            mp.setenv(key, value)
        mp.delenv("NIGHTSHIFT_SOURCE", raising=False)
        mp.delenv("NIGHTSHIFT_TIME_BUDGET", raising=False)
        spec = importlib.util.spec_from_file_location(
            "nightshift_trainer_prepare", TRAINER / "prepare.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    yield module


def make_run_dir(tmp_path: Path, edit: tuple[str, str] | None = None) -> Path:
    """A run folder as the launcher makes one: prepare.py and a (possibly edited) train.py."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(TRAINER / "prepare.py", run_dir)
    source = (TRAINER / "train.py").read_text()
    if edit is not None:
        assert edit[0] in source, f"edit target not found: {edit[0]!r}"
        source = source.replace(edit[0], edit[1])
    (run_dir / "train.py").write_text(source)
    return run_dir


def run_train(
    run_dir: Path, cache: Path, timeout: float = 120, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "train.py"],
        cwd=run_dir,
        text=True,
        capture_output=True,
        env=trainer_env(cache, **extra),
        timeout=timeout,
    )


# ---------------------------------------------------------------------------
# prepare.py
# ---------------------------------------------------------------------------


def test_second_prepare_is_a_noop(cache: Path) -> None:
    prepared = next(p for p in cache.iterdir() if p.name.startswith("cpu-stdlib"))
    before = {p: p.stat().st_mtime_ns for p in prepared.rglob("*")}
    proc = run_prepare(cache)
    assert proc.returncode == 0, proc.stderr
    assert "Cached" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in prepared.rglob("*")} == before
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]


def test_tokenizer_round_trips_and_counts_bytes(prep: ModuleType) -> None:
    tok = prep.Tokenizer.from_directory()
    assert tok.get_vocab_size() == prep.VOCAB_SIZE == 2048
    assert tok.get_bos_token_id() == tok.enc.encode_single_token("<|reserved_0|>")
    token_bytes = prep.get_token_bytes()
    assert token_bytes.shape == (tok.get_vocab_size(),)
    for text in [
        "def f(x):\n    return x ** 2  # square\n",
        "Héllo wörld, 你好! 🙂 ¿Qué?",
        "\t\n  \r\n",
        "a" * 1000,
        "",
    ]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # token byte lengths add up to the text's UTF-8 length, even across split characters
        assert int(token_bytes[torch.tensor(ids, dtype=torch.long)].sum()) == len(text.encode())
    assert tok.encode(["ab", "cd"], prepend=tok.get_bos_token_id())[1][0] == tok.get_bos_token_id()
    specials = [tok.enc.encode_single_token(f"<|reserved_{i}|>") for i in range(4)]
    assert token_bytes[specials].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("split", ["train", "val"])
def test_dataloader_rows_start_with_bos_and_have_no_padding(prep: ModuleType, split: str) -> None:
    tok = prep.Tokenizer.from_directory()
    bos, B, T = tok.get_bos_token_id(), 8, 64
    loader = prep.make_dataloader(tok, B, T, split, device="cpu")
    rows = []
    for _ in range(5):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (B, T) and epoch == 1
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        rows.append(torch.cat([x, y[:, -1:]], dim=1).clone())
    rows_t = torch.cat(rows)
    assert (rows_t[:, 0] == bos).all()
    # No padding: only real tokens; the only special token is BOS, at document starts
    assert ((rows_t >= 0) & (rows_t < tok.get_vocab_size())).all()
    assert not ((rows_t > bos) & (rows_t < bos + 4)).any()
    assert ((rows_t == bos).sum(dim=1) > 1).any()  # several documents packed in one row


def reference_packed_rows(
    prep: ModuleType, tok: object, B: int, T: int, split: str, batches: int, buffer_size: int = 1000
) -> torch.Tensor:
    """Autoresearch's best-fit packing, written plainly: (batches * B, T + 1) token rows."""
    docs = prep._document_batches(split)
    bos = tok.get_bos_token_id()  # type: ignore[attr-defined]
    buffer: list[list[int]] = []
    rows = []
    for _ in range(batches * B):
        row: list[int] = []
        while len(row) < T + 1:
            while len(buffer) < buffer_size:
                buffer.extend(tok.encode(next(docs)[0], prepend=bos))  # type: ignore[attr-defined]
            remaining = T + 1 - len(row)
            best_idx, best_len = -1, 0
            for i, doc in enumerate(buffer):
                if best_len < len(doc) <= remaining:
                    best_idx, best_len = i, len(doc)
            if best_idx >= 0:
                row += buffer.pop(best_idx)
            else:
                shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                row += buffer.pop(shortest)[:remaining]
        rows.append(row)
    return torch.tensor(rows)


@pytest.mark.parametrize(("B", "T", "split"), [(8, 64, "train"), (4, 300, "val")])
def test_dataloader_packs_exactly_like_the_plain_best_fit(
    prep: ModuleType, B: int, T: int, split: str
) -> None:
    tok = prep.Tokenizer.from_directory()
    loader = prep.make_dataloader(tok, B, T, split, device="cpu")
    got = []
    for _ in range(6):
        x, y, _ = next(loader)
        got.append(torch.cat([x, y[:, -1:]], dim=1).clone())
    assert torch.equal(torch.cat(got), reference_packed_rows(prep, tok, B, T, split, 6))


def test_training_token_estimate_and_the_small_data_warning(prep: ModuleType) -> None:
    # The estimate extrapolates from a sample: here 100k characters of the validation file
    files = prep.list_parquet_files("val")
    tok = prep.Tokenizer.from_directory()
    docs = pq.read_table(files[0], columns=["text"]).column("text").to_pylist()
    exact = sum(len(ids) for ids in tok.enc.encode_ordinary_batch(docs))
    assert sum(map(len, docs)) > 300_000  # so that the sample is a part of it
    estimate = prep.estimate_train_tokens(files, tok.enc, sample_chars=100_000)
    assert estimate == pytest.approx(exact, rel=0.05)
    # The offline source is too small for a gpu run (the seed reads ~480M tokens on an H200)
    meta = prep.read_meta()
    assert meta["train_tokens"] > prep.PROFILES["cpu"]["run_tokens"]
    assert prep.data_size_warning(meta) == ""
    small = dict(meta, profile="gpu", train_tokens=2_600_000)
    warning = prep.data_size_warning(small)
    assert "~2.6M training tokens" in warning and "~185 times" in warning
    assert "--source climbmix" in warning
    assert prep.data_size_warning({"source": "climbmix", "profile": "gpu"}) == ""


class UniformModel(torch.nn.Module):
    """Uniform logits: every target costs ln(V) nats."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = torch.zeros(y.numel(), self.vocab_size) + self.dummy
        return F.cross_entropy(logits, y.reshape(-1), reduction=reduction)


def test_evaluate_bpb_of_uniform_model_matches_hand_computation(prep: ModuleType) -> None:
    tok = prep.Tokenizer.from_directory()
    V, T = tok.get_vocab_size(), prep.MAX_SEQ_LEN
    rows = prep.EVAL_TOKENS // T
    # By hand, from the tokenizer itself rather than the stored byte lengths
    loader = prep.make_dataloader(tok, rows, T, "val", device="cpu")
    _, y, _ = next(loader)
    special = {tok.enc.encode_single_token(f"<|reserved_{i}|>") for i in range(4)}
    lengths = [
        0 if t in special else len(tok.enc.decode_single_token_bytes(t))
        for t in y.reshape(-1).tolist()
    ]
    n_scored = sum(1 for n in lengths if n > 0)
    expected = math.log(V) * n_scored / (math.log(2) * sum(lengths))
    model = UniformModel(V)
    assert prep.evaluate_bpb(model, tok, 16) == pytest.approx(expected, rel=1e-6)
    # The evaluation set does not depend on the batch size (7 does not divide the rows)
    assert prep.evaluate_bpb(model, tok, 7) == pytest.approx(expected, rel=1e-6)


def test_concurrent_prepares_of_a_dir_source_agree(tmp_path: Path) -> None:
    src = tmp_path / "texts"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in [
        "argparse.py",
        "typing.py",
        "inspect.py",
        "pathlib.py",
        "dataclasses.py",
        "enum.py",
        "functools.py",
        "collections/__init__.py",
        "json/decoder.py",
        "logging/__init__.py",
        "subprocess.py",
        "tarfile.py",
        "zipfile.py",
    ]:
        dest = src / name.replace("/", "_")
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(stdlib / name, dest)
    (src / "notes.md").write_text("# Notes\n\nSome prose.\n\nMore prose, ünïcode.\n")
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "prepare.py", "--source", f"dir:{src}"],
            cwd=TRAINER,
            env=trainer_env(cache),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    prepared = [p for p in cache.iterdir() if p.name.startswith("cpu-dir-texts-")]
    assert len(prepared) == 1
    assert (prepared[0] / "meta.json").exists()
    assert (prepared[0] / "tokenizer" / "token_bytes.pt").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]


# ---------------------------------------------------------------------------
# train.py, as real runs
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_seed_runs_end_to_end_and_prints_the_summary(
    cache: Path, tmp_path: Path, prep: ModuleType
) -> None:
    run_dir = make_run_dir(tmp_path)
    t0 = time.time()
    proc = run_train(run_dir, cache, NIGHTSHIFT_TIME_BUDGET="8")
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = SUMMARY_RE.search(proc.stdout)
    assert match, proc.stdout[-2000:]
    summary = {k: float(v) for k, v in match.groupdict().items()}
    steps = [PROGRESS_LINE.match(line) for line in proc.stdout.splitlines()]
    progress = [m for m in steps if m]
    assert len(progress) == summary["num_steps"] > 3
    assert [int(m.group(1)) for m in progress] == list(range(len(progress)))
    # the budget is reached and overshot by at most a step or two (slow on a busy machine)
    assert 8 <= summary["training_seconds"] < 40
    assert summary["total_seconds"] <= wall
    assert summary["depth"] == 3 and summary["num_params_M"] > 0.5
    # It learned: better than the uniform model's bpb (~3.2 on this data), not absurdly good
    uniform = prep.evaluate_bpb(UniformModel(2048), prep.Tokenizer.from_directory(), 16)
    assert 0.5 < summary["val_bpb"] < uniform - 0.1


@pytest.mark.slow
def test_nan_loss_prints_fail_and_exits_1(cache: Path, tmp_path: Path) -> None:
    run_dir = make_run_dir(
        tmp_path, ("loss = train_model(x, y)\n", "loss = train_model(x, y) * float('nan')\n")
    )
    proc = run_train(run_dir, cache, NIGHTSHIFT_TIME_BUDGET="8")
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout.splitlines()
    assert "val_bpb:" not in proc.stdout


@pytest.mark.slow
def test_exploding_learning_rate_fails(cache: Path, tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, ("\nMATRIX_LR = 0.04", "\nMATRIX_LR = 1e30"))
    proc = run_train(run_dir, cache, NIGHTSHIFT_TIME_BUDGET="8")
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "FAIL" in proc.stdout.splitlines()


def test_syntax_error_fails_at_once(cache: Path, tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, ("\nMATRIX_LR = 0.04", "\nMATRIX_LR = 0.04)"))
    t0 = time.time()
    proc = run_train(run_dir, cache, timeout=30)
    assert proc.returncode != 0
    assert "SyntaxError" in proc.stderr
    assert time.time() - t0 < 10


def test_missing_cache_says_to_run_prepare(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    proc = run_train(run_dir, tmp_path / "empty-cache", timeout=60)
    assert proc.returncode != 0
    assert "python prepare.py" in proc.stderr
