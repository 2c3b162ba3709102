"""
One-time data preparation for nightshift experiments, and the fixed runtime harness that
train.py imports (tokenizer, dataloader, evaluate_bpb, time budget). The researcher never
edits this file. Adapted from karpathy/autoresearch's prepare.py.

Usage:
    python prepare.py                      # offline default: the Python standard library's sources
    python prepare.py --source climbmix    # autoresearch's data set (needs internet)
    python prepare.py --source dir:PATH    # your own text files and/or parquet files ("text" column)

Environment (read by prepare.py and train.py alike, so set them the same way for both):
    NIGHTSHIFT_PROFILE      gpu | cpu (default: gpu when CUDA is available, else cpu)
    NIGHTSHIFT_SOURCE       stdlib | climbmix | dir:PATH (default: stdlib)
    NIGHTSHIFT_CACHE        cache root (default: ~/.cache/nightshift)
    NIGHTSHIFT_TIME_BUDGET  training seconds, overriding the profile's budget (for tests)
"""

import argparse
import hashlib
import itertools
import json
import math
import os
import pickle
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import rustbpe
import tiktoken
import torch

# ---------------------------------------------------------------------------
# Constants (fixed, do not modify)
# ---------------------------------------------------------------------------

# gpu is autoresearch's setup. cpu is sized so that one whole experiment (start, training,
# evaluation) fits in well under a minute on two cores and still separates good from bad variants.
# run_tokens: about what the seed reads in one run (gpu: 1.6M tokens/s measured on an H200;
# cpu: ~5k tokens/s on 2 cores), to warn when a data set is too small to research on.
PROFILES: dict[str, dict[str, float]] = {
    "gpu": {"max_seq_len": 2048, "time_budget": 300, "eval_tokens": 40 * 524288,
            "vocab_size": 8192, "tokenizer_chars": 1_000_000_000, "run_tokens": 480_000_000},
    "cpu": {"max_seq_len": 256, "time_budget": 25, "eval_tokens": 128 * 256,
            "vocab_size": 2048, "tokenizer_chars": 4_000_000, "run_tokens": 125_000},
}
PROFILE = os.environ.get("NIGHTSHIFT_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
if PROFILE not in PROFILES:
    sys.exit(f"NIGHTSHIFT_PROFILE must be one of {sorted(PROFILES)}, not {PROFILE!r}")
_P = PROFILES[PROFILE]
MAX_SEQ_LEN = int(_P["max_seq_len"])          # context length
TIME_BUDGET = float(os.environ.get("NIGHTSHIFT_TIME_BUDGET") or _P["time_budget"])  # training s
EVAL_TOKENS = int(_P["eval_tokens"])          # number of tokens for val eval
VOCAB_SIZE = int(_P["vocab_size"])

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

SOURCE = os.environ.get("NIGHTSHIFT_SOURCE") or "stdlib"
CACHE_DIR = Path(os.environ.get("NIGHTSHIFT_CACHE") or Path.home() / ".cache" / "nightshift")
BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542  # the last datashard is shard_06542.parquet
VAL_SHARD = MAX_SHARD  # pinned validation shard (shard_06542)
VAL_PERCENT = 5  # text sources: the share of files (by path hash) held out for validation
DOCS_PER_SHARD = 100_000  # text sources: documents per written parquet shard

# BPE split pattern (GPT-4 style, with \p{N}{1,2} instead of {1,3})
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = "<|reserved_0|>"


def source_key(source: str) -> str:
    """Cache folder name of a source: what it holds depends on the source and the profile."""
    if source == "stdlib":  # differs between Python versions, so the version is part of the key
        return f"{PROFILE}-stdlib-py{sys.version_info.major}{sys.version_info.minor}"
    if source.startswith("dir:"):
        path = str(Path(source[4:]).expanduser().resolve())
        return f"{PROFILE}-dir-{Path(path).name}-{hashlib.sha256(path.encode()).hexdigest()[:10]}"
    if source == "climbmix":
        return f"{PROFILE}-climbmix"
    sys.exit(f"unknown source {source!r}: use stdlib, climbmix or dir:PATH")


PREPARED_DIR = CACHE_DIR / source_key(SOURCE)
TOKENIZER_DIR = PREPARED_DIR / "tokenizer"

# ---------------------------------------------------------------------------
# Data: climbmix download (autoresearch's data set)
# ---------------------------------------------------------------------------


def download_single_shard(args: tuple[int, str]) -> bool:
    """Download one parquet shard with retries. Returns True on success."""
    index, data_dir = args
    filename = f"shard_{index:05d}.parquet"
    filepath = os.path.join(data_dir, filename)
    if os.path.exists(filepath):
        return True
    import requests  # only this path needs the network, so only it needs requests

    url = f"{BASE_URL}/{filename}"
    max_attempts = 5
    temp_path = f"{filepath}.tmp{os.getpid()}"  # per process: two prepares may run at once
    for attempt in range(1, max_attempts + 1):
        try:
            response = requests.get(url, stream=True, timeout=30)
            response.raise_for_status()
            with open(temp_path, "wb") as f:
                for chunk in response.iter_content(chunk_size=1024 * 1024):
                    if chunk:
                        f.write(chunk)
            os.replace(temp_path, filepath)
            print(f"  Downloaded {filename}")
            return True
        except (requests.RequestException, OSError) as e:
            print(f"  Attempt {attempt}/{max_attempts} failed for {filename}: {e}")
            if os.path.exists(temp_path):
                os.remove(temp_path)
            if attempt < max_attempts:
                time.sleep(2**attempt)
    return False


def download_climbmix(data_dir: Path, num_shards: int, download_workers: int) -> None:
    """Download training shards + pinned validation shard (shared by every profile)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ids = list(range(min(num_shards, MAX_SHARD)))
    if VAL_SHARD not in ids:
        ids.append(VAL_SHARD)
    needed = [i for i in ids if not (data_dir / f"shard_{i:05d}.parquet").exists()]
    if needed:
        print(f"Data: downloading {len(needed)} shards ({len(ids) - len(needed)} already exist)...")
        with Pool(processes=max(1, min(download_workers, len(needed)))) as pool:
            ok = pool.map(download_single_shard, [(i, str(data_dir)) for i in needed])
        if not all(ok):
            sys.exit(f"Data: {ok.count(False)} shards failed to download; run prepare.py again")
    print(f"Data: {len(ids)} shards ready at {data_dir}")


# ---------------------------------------------------------------------------
# Data: text sources (offline)
# ---------------------------------------------------------------------------


def split_document(text: str, max_chars: int) -> list[str]:
    """Cut a file into documents at blank lines followed by an unindented line (top-level code
    blocks, paragraphs), each at most ~max_chars. Whole files are mostly longer than a row, so
    best-fit packing would otherwise only ever see the first MAX_SEQ_LEN tokens of each."""
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        at_boundary = size >= max_chars // 2 and cur[-1].strip() == "" and line[:1].strip() != ""
        if cur and (at_boundary or size + len(line) > max_chars):
            chunks.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        chunks.append("".join(cur))
    return [c for c in chunks if c.strip()]


def is_val(key: str) -> bool:
    """Deterministic, content-independent train/val split by hash."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100 < VAL_PERCENT


def text_source_files(source: str) -> tuple[Path, list[Path]]:
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in root.rglob("*.py")
                 if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
    else:
        root = Path(source[4:]).expanduser().resolve()
        files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not files:
        sys.exit(f"Data: no files found for source {source!r} under {root}")
    return root, sorted(files)  # sorted: the same order on every machine


def build_text_source(source: str, data_dir: Path) -> tuple[int, int]:
    """Turn a folder of files into shuffled parquet shards of documents plus val.parquet."""
    root, files = text_source_files(source)
    max_chars = 3 * MAX_SEQ_LEN  # ~0.8 rows at ~3.5 characters per token
    train: list[str] = []
    val: list[str] = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".parquet":  # documents as they are; split per document
            for doc in pq.read_table(path, columns=["text"]).column("text").to_pylist():
                if doc:
                    (val if is_val(doc) else train).append(doc)
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # binary files and the stdlib's deliberately mis-encoded test files
        if "\x00" in text:
            continue
        (val if is_val(rel) else train).extend(split_document(text, max_chars))
    if not train or not val:
        sys.exit(f"Data: source {source!r} gave {len(train)} train / {len(val)} val documents; "
                 "it needs more files")
    # A fixed shuffle, like climbmix-400b-shuffle: a short run sees a sample of everything,
    # and a small eval set is a sample of the whole validation split.
    random.Random(1337).shuffle(train)
    random.Random(1338).shuffle(val)
    data_dir.mkdir(parents=True)
    for i in range(0, len(train), DOCS_PER_SHARD):
        table = pa.table({"text": train[i:i + DOCS_PER_SHARD]})
        pq.write_table(table, data_dir / f"shard_{i // DOCS_PER_SHARD:05d}.parquet",
                       row_group_size=1024)
    pq.write_table(pa.table({"text": val}), data_dir / "val.parquet", row_group_size=1024)
    return len(train), len(val)


def estimate_train_tokens(files: list[Path], enc: tiktoken.Encoding,
                          sample_chars: int = 2_000_000) -> int:
    """Training tokens of a source: all its characters, over the characters per token of a
    sample (tokenizing everything could take minutes for a large data set)."""
    total_chars = sum(pc.sum(pc.utf8_length(pq.read_table(f, columns=["text"]).column("text")))
                      .as_py() or 0 for f in files)
    sample = list(text_iterator(files, sample_chars))
    sample_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(sample))
    return int(total_chars * sample_tokens / max(1, sum(map(len, sample))))


def data_size_warning(meta: dict[str, Any]) -> str:
    """'' or a warning that one run of this profile reads more tokens than the training data
    holds: it would repeat them, and val_bpb would measure memorization more than modeling."""
    train_tokens = int(meta.get("train_tokens") or 0)
    run_tokens = int(PROFILES[str(meta["profile"])]["run_tokens"])
    if not train_tokens or train_tokens >= run_tokens:
        return ""
    return (f"WARNING: source {meta['source']} holds ~{train_tokens / 1e6:.1f}M training tokens, "
            f"but one {meta['profile']}-profile run reads ~{run_tokens / 1e6:.1f}M: it repeats "
            f"the data ~{run_tokens / train_tokens:.0f} times, so val_bpb measures memorization "
            "more than modeling. For real research prepare a larger source: "
            "python prepare.py --source climbmix (or dir:PATH).")


def read_meta(prepared_dir: Path = PREPARED_DIR) -> dict[str, Any]:
    meta_path = prepared_dir / "meta.json"
    if not meta_path.exists():
        sys.exit(f"No prepared data for profile={PROFILE} source={SOURCE} at {prepared_dir}.\n"
                 "Run `python prepare.py` first (with the same NIGHTSHIFT_PROFILE, "
                 "NIGHTSHIFT_SOURCE and NIGHTSHIFT_CACHE as this run).")
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    return meta


def list_parquet_files(split: str, prepared_dir: Path = PREPARED_DIR) -> list[Path]:
    """Sorted training shards, or the one validation file."""
    meta = read_meta(prepared_dir)
    data_dir = (prepared_dir / meta["data_dir"]).resolve()
    if split == "val":
        return [data_dir / meta["val_file"]]
    files = sorted(p for p in data_dir.glob("shard_*.parquet") if p.name != meta["val_file"])
    assert files, f"No training shards found in {data_dir}"
    return files


# ---------------------------------------------------------------------------
# Tokenizer training
# ---------------------------------------------------------------------------


def text_iterator(files: list[Path], max_chars: int, doc_cap: int = 10_000) -> Iterator[str]:
    """Yield documents from the training split only."""
    nchars = 0
    for filepath in files:
        pf = pq.ParquetFile(filepath)
        for rg_idx in range(pf.num_row_groups):
            for text in pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist():
                doc = text[:doc_cap]
                nchars += len(doc)
                yield doc
                if nchars >= max_chars:
                    return


def train_tokenizer(files: list[Path], tokenizer_dir: Path) -> tiktoken.Encoding:
    """Train BPE with rustbpe, save it as a tiktoken pickle plus each token's byte length."""
    t0 = time.time()
    tokenizer = rustbpe.Tokenizer()
    max_chars = int(PROFILES[PROFILE]["tokenizer_chars"])
    tokenizer.train_from_iterator(text_iterator(files, max_chars),
                                  VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    mergeable_ranks = {bytes(k): v for k, v in tokenizer.get_mergeable_ranks()}
    offset = len(mergeable_ranks)
    enc = tiktoken.Encoding(
        name="rustbpe",
        pat_str=tokenizer.get_pattern(),
        mergeable_ranks=mergeable_ranks,
        special_tokens={name: offset + i for i, name in enumerate(SPECIAL_TOKENS)},
    )
    tokenizer_dir.mkdir(parents=True)
    with open(tokenizer_dir / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    # Exact byte length of every token for bits per byte (0 for the special tokens). Decoding
    # single tokens to str would count a partial UTF-8 sequence as one 3-byte U+FFFD.
    special_ids = {enc.encode_single_token(s) for s in SPECIAL_TOKENS}
    token_bytes = [0 if i in special_ids else len(enc.decode_single_token_bytes(i))
                   for i in range(enc.n_vocab)]
    torch.save(torch.tensor(token_bytes, dtype=torch.int32), tokenizer_dir / "token_bytes.pt")
    test = "Hello world! Numbers: 123. Unicode: 你好\n\tdef f(x):  return x ** 2\n"
    assert enc.decode(enc.encode_ordinary(test)) == test, "Tokenizer roundtrip failed"
    print(f"Tokenizer: trained in {time.time() - t0:.1f}s (vocab_size={enc.n_vocab})")
    return enc


def prepare(source: str = SOURCE, num_shards: int = 10, download_workers: int = 8) -> Path:
    """Prepare data and tokenizer once per machine; a no-op when they are cached. Everything
    is built in a private temp folder and renamed into place, so concurrent prepares of the
    same key cannot leave a half-written cache (the last one to finish discards its copy)."""
    final = CACHE_DIR / source_key(source)
    if (final / "meta.json").exists():
        print(f"Cached: data and tokenizer for profile={PROFILE} source={source} at {final}")
        return final
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=CACHE_DIR))
    try:
        meta: dict[str, object] = {"source": source, "profile": PROFILE, "vocab_size": VOCAB_SIZE,
                                   "max_seq_len": MAX_SEQ_LEN, "python": sys.version.split()[0]}
        if source == "climbmix":
            shards = CACHE_DIR / "climbmix"  # raw shards are shared by every profile
            download_climbmix(shards, num_shards, download_workers)
            meta.update(data_dir="../climbmix", val_file=f"shard_{VAL_SHARD:05d}.parquet")
        else:
            t0 = time.time()
            n_train, n_val = build_text_source(source, tmp / "data")
            meta.update(data_dir="data", val_file="val.parquet", train_docs=n_train, val_docs=n_val)
            print(f"Data: {n_train} train / {n_val} val documents in {time.time() - t0:.1f}s")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        train_files = list_parquet_files("train", tmp)
        enc = train_tokenizer(train_files, tmp / "tokenizer")
        train_tokens = estimate_train_tokens(train_files, enc)
        meta["train_tokens"] = train_tokens
        print(f"Data: ~{train_tokens / 1e6:.1f}M training tokens")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another prepare got there first: its cache is as good as ours
            if not (final / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"Prepared: {final}")
    if warning := data_size_warning(read_meta(final)):
        print(warning)
    return final


# ---------------------------------------------------------------------------
# Runtime utilities (imported by train.py)
# ---------------------------------------------------------------------------


class Tokenizer:
    """Minimal tokenizer wrapper. Training is handled above."""

    def __init__(self, enc: tiktoken.Encoding) -> None:
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir: Path = TOKENIZER_DIR) -> "Tokenizer":
        meta = read_meta(tokenizer_dir.parent)  # a clear message when prepare.py has not run
        if warning := data_size_warning(meta):
            print(warning)
        with open(tokenizer_dir / "tokenizer.pkl", "rb") as f:
            return cls(pickle.load(f))

    def get_vocab_size(self) -> int:
        return int(self.enc.n_vocab)

    def get_bos_token_id(self) -> int:
        return int(self.bos_token_id)

    def encode(self, text: str | list[str], prepend: int | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ids if prepend is None else [prepend, *ids]
        rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        return rows if prepend is None else [[prepend, *row] for row in rows]

    def decode(self, ids: list[int]) -> str:
        return str(self.enc.decode(ids))


def get_token_bytes(device: torch.device | str = "cpu",
                    tokenizer_dir: Path = TOKENIZER_DIR) -> torch.Tensor:
    return torch.load(tokenizer_dir / "token_bytes.pt", map_location=device)


def _document_batches(split: str, tokenizer_batch_size: int = 128,
                      prepared_dir: Path = PREPARED_DIR) -> Iterator[tuple[list[str], int]]:
    """Infinite iterator over (document batch, epoch) from the split's parquet files."""
    files = list_parquet_files(split, prepared_dir)
    epoch = 1
    while True:
        for filepath in files:
            pf = pq.ParquetFile(filepath)
            for rg_idx in range(pf.num_row_groups):
                batch = pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
                for i in range(0, len(batch), tokenizer_batch_size):
                    yield batch[i:i + tokenizer_batch_size], epoch
        epoch += 1


def make_dataloader(tokenizer: Tokenizer, B: int, T: int, split: str, buffer_size: int = 1000,
                    device: torch.device | str | None = None,
                    prepared_dir: Path = PREPARED_DIR,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """
    BOS-aligned dataloader with best-fit packing.
    Every row starts with BOS. Documents packed using best-fit to minimize cropping.
    When no document fits remaining space, crops shortest doc to fill exactly.
    100% utilization (no padding). The yielded tensors are reused by the next batch.
    """
    assert split in ["train", "val"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    row_capacity = T + 1
    batches = _document_batches(split, prepared_dir=prepared_dir)
    bos_token = tokenizer.get_bos_token_id()
    doc_buffer: list[list[int]] = []
    doc_lens: list[int] = []  # len() of each buffered document, kept in step with doc_buffer
    epoch = 1

    def refill_buffer() -> None:
        nonlocal epoch
        doc_batch, epoch = next(batches)
        docs: list[list[int]] = tokenizer.encode(doc_batch, prepend=bos_token)  # type: ignore[assignment]
        doc_buffer.extend(docs)
        doc_lens.extend(map(len, docs))

    def pack_row() -> list[int]:
        # Plain lists and C-level max/index: a gpu-profile step places ~500 documents, on the
        # same CPU thread that feeds the GPU, so this must stay well under a step's time.
        row: list[int] = []
        while len(row) < row_capacity:
            while len(doc_buffer) < buffer_size:
                refill_buffer()
            remaining = row_capacity - len(row)
            # Find largest doc that fits entirely (the first of equals)
            best_len = max((n for n in doc_lens if n <= remaining), default=0)
            if best_len:
                i = doc_lens.index(best_len)
                row += doc_buffer.pop(i)
            else:  # No doc fits: crop shortest to fill remaining
                i = doc_lens.index(min(doc_lens))
                row += doc_buffer.pop(i)[:remaining]
            doc_lens.pop(i)
        return row

    # Layout of each buffer: [inputs (B*T) | targets (B*T)]. On CUDA two pinned host buffers take
    # turns: the copy out of one is asynchronous, so it is rewritten only once that copy is done.
    on_cuda = device.type == "cuda"
    cpu_buffers = [torch.empty(2 * B * T, dtype=torch.long, pin_memory=on_cuda)
                   for _ in range(2 if on_cuda else 1)]
    copied: list[torch.cuda.Event | None] = [None] * len(cpu_buffers)
    dev_buffer = torch.empty(2 * B * T, dtype=torch.long, device=device) if on_cuda else cpu_buffers[0]
    inputs = dev_buffer[:B * T].view(B, T)
    targets = dev_buffer[B * T:].view(B, T)

    for n in itertools.count():
        rows = torch.tensor([pack_row() for _ in range(B)], dtype=torch.long)
        k = n % len(cpu_buffers)
        event = copied[k]
        if event is not None:
            event.synchronize()
        cpu_buffers[k][:B * T].view(B, T).copy_(rows[:, :-1])
        cpu_buffers[k][B * T:].view(B, T).copy_(rows[:, 1:])
        if on_cuda:
            dev_buffer.copy_(cpu_buffers[k], non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            copied[k] = done
        yield inputs, targets, epoch


# ---------------------------------------------------------------------------
# Evaluation (DO NOT CHANGE — this is the fixed metric)
# ---------------------------------------------------------------------------


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, tokenizer: Tokenizer, batch_size: int) -> float:
    """
    Bits per byte (BPB): vocab size-independent evaluation metric.
    Sums per-token cross-entropy (in nats), sums target byte lengths,
    then converts nats/byte to bits/byte. Special tokens (byte length 0)
    are excluded from both sums. `model(x, y, reduction='none')` returns per-token losses.
    The set is the first EVAL_TOKENS // MAX_SEQ_LEN rows of the val loader whatever the batch
    size: surplus rows of the last batch are computed (fixed shapes for torch.compile) and masked.
    """
    device = next(model.parameters()).device
    token_bytes = get_token_bytes(device)
    val_loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val", device=device)
    rows_left = EVAL_TOKENS // MAX_SEQ_LEN
    total_nats = 0.0
    total_bytes = 0
    while rows_left > 0:
        x, y, _ = next(val_loader)
        keep = (torch.arange(batch_size, device=device) < rows_left)[:, None]
        rows_left -= batch_size
        loss = model(x, y, reduction="none").view(batch_size, -1).float()
        nbytes = token_bytes[y] * keep
        total_nats += (loss * (nbytes > 0)).sum().item()
        total_bytes += int(nbytes.sum().item())
    return total_nats / (math.log(2) * total_bytes)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Prepare data and tokenizer for nightshift")
    parser.add_argument("--source", default=SOURCE, help="stdlib | climbmix | dir:PATH")
    parser.add_argument("--num-shards", type=int, default=10, help="climbmix: training shards to "
                        "download (-1 = all). Val shard is always pinned.")
    parser.add_argument("--download-workers", type=int, default=8, help="climbmix: parallel downloads")
    args = parser.parse_args()
    print(f"Cache directory: {CACHE_DIR} (profile={PROFILE}, source={args.source})")
    prepare(args.source, MAX_SHARD if args.num_shards == -1 else args.num_shards,
            args.download_workers)
    if args.source != SOURCE:
        print(f"Train with NIGHTSHIFT_SOURCE={args.source} so that train.py finds this data.")
    print("Done! Ready to train.")
