"""Model workers: load a model by name, place it with DeepSpeed, run its forwards.

Every model goes through DeepSpeed: trainable ones through ``deepspeed.initialize``
with an AdamW optimizer (ZeRO stage, precision, offload of the optimizer state and of the
parameters, gradient checkpointing and gradient clipping from the ``Model`` spec); frozen
ones under ZeRO-3 through ``deepspeed.initialize`` without an optimizer (sharded over the
ranks, as trainers place reference and reward models), other frozen ones through
``deepspeed.init_inference`` (a whole copy per rank). On a machine with no GPU DeepSpeed's
CPU accelerator and the gloo backend are used; a single process gets its rank/world
environment set here so that DeepSpeed does not look for MPI.

``Model.path`` is a Hugging Face id, a local directory, or a ``builtin:`` name (a
provider's model, built and cached on first use: ``rlflow.builtin``). All three go
through the same ``from_pretrained`` calls.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from rlflow import builtin, dist
from rlflow.provider import Train
from rlflow.registry import UnknownName
from rlflow.spec import Model


ADAPTER_DIR = "adapter"  # final/adapter/: a LoRA model's adapter alone, beside the merged model


class ModelLoadError(Exception):
    """A model that cannot be found or loaded (reported without a traceback)."""


def check_path(path: str) -> Optional[str]:
    """Why ``path`` cannot name a model, or None. Cheap: loads nothing."""
    if path.startswith(builtin.PREFIX):
        try:
            builtin.model_provider(path)
        except UnknownName as e:
            return str(e)
        return None
    p = Path(path).expanduser()
    if p.is_file():
        return f"model path {path!r} is a file; a model is a directory with a config.json (save_pretrained)"
    if p.exists():
        return None if (p / "config.json").exists() else f"{path!r} is a directory without a config.json (not a saved Hugging Face model)"
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith(("/",))
    if looks_local:
        return f"model path {path!r} does not exist"
    return None  # a Hugging Face id: it may be in the local cache


def resolve(path: str, *, train: Optional[Train] = None, on_build: Optional[Callable[[str], None]] = None) -> str:
    """A directory or hub id that ``from_pretrained`` can load.

    A ``builtin:`` model is built on first use (``train`` runs a pipeline, for models made
    by training; the engine supplies it). A hub id that is not in the local cache fails
    here, at once, when the hub cannot be reached (see :func:`hub_offline`).
    """
    problem = check_path(path)
    if problem:
        raise ModelLoadError(problem)
    if path.startswith(builtin.PREFIX):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not builtin.model_dir(path).exists():
            _build_alone(path)  # a build is a training run of its own: not inside this process group
        try:
            return str(builtin.ensure_builtin(path, train=train, on_build=on_build))
        except builtin.CacheError as e:
            raise ModelLoadError(str(e)) from e
    local = Path(path).expanduser()
    if local.exists():
        return str(local)
    if hub_offline() and not _in_hub_cache(path):
        raise ModelLoadError(f"model {path!r} is not in the local Hugging Face cache and the hub cannot be reached: "
                             f"download it where there is a network (hf download {path}), give a local directory, "
                             "or set RLFLOW_ONLINE=1 to try the hub anyway")
    return path


def _build_alone(path: str) -> None:
    """Build built-in model ``path`` in a single-process child (every rank may ask; the cache's
    lock lets one build and the others wait for it)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                          "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "ROLE_RANK")}
    code = ("import sys; from rlflow.builtin import ensure_builtin; from rlflow.engine import train_pipeline; "
            "ensure_builtin(sys.argv[1], train=train_pipeline)")
    done = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise ModelLoadError(f"building {path} failed:\n{done.stderr[-2000:]}")


_OFFLINE: Optional[bool] = None


def _reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to the host of ``url`` opens within ``timeout`` seconds
    (name lookup included: the probe runs in a thread that is abandoned at the timeout)."""
    import socket
    import threading
    from urllib.parse import urlparse

    u = urlparse(url)
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout).close()
            opened.append(True)
        except (OSError, ValueError):
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(opened)


def hub_offline(timeout: float = 2.0) -> bool:
    """Whether Hugging Face hub ids resolve from the local cache alone; decided once a process.

    Offline when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set, or when the hub
    (``$HF_ENDPOINT``, default https://huggingface.co) does not accept a connection within
    ``timeout`` seconds. In the last case both variables are set, for this process and its
    children, so that loading fails at once instead of retrying the network for about a
    minute. ``RLFLOW_ONLINE=1`` skips the probe and leaves the hub libraries as they are.
    """
    global _OFFLINE
    if _OFFLINE is None:
        flags = [os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
        if any(f in ("1", "ON", "YES", "TRUE") for f in flags):
            _OFFLINE = True
        elif os.environ.get("RLFLOW_ONLINE") == "1":
            _OFFLINE = False
        else:
            _OFFLINE = not _reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)
            if _OFFLINE:
                _go_offline()
    return _OFFLINE


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import huggingface_hub.constants  # read once at its import: set it too, in case it was imported already

    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id`` (its config.json)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def setup_distributed() -> None:
    """Initialise torch.distributed for DeepSpeed (gloo on CPU), once per process."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:  # a free port, so parallel single-process runs do not collide
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import contextlib
    import io

    import deepspeed

    if not torch.distributed.is_initialized():
        # DeepSpeed prints the (JIT-built, cached) communication op it loads: not news to a user
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl", verbose=False)


def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def compute_dtype(spec: Model):
    """The dtype a model's matmuls run in (its ``precision``): the peak its MFU is measured against."""
    return _dtype(spec.precision)


def autocast_dtype(spec: Model):
    """The autocast dtype of a model that keeps fp32 weights and computes in lower precision, or None.

    ``precision="bf16"`` on a CPU (no CUDA) is autocast: the weights, the optimizer and its
    master copy stay fp32 and the matmuls run in bf16 (AVX512-BF16 / AMX) inside
    ``torch.autocast``, with norms, softmax and log-probs in fp32. On a GPU, bf16 is
    DeepSpeed's: bf16 weights, fp32 master weights in the optimizer.
    """
    import torch

    return torch.bfloat16 if spec.precision == "bf16" and not torch.cuda.is_available() else None


def _weight_dtype(spec: Model):
    """The dtype the weights are loaded and kept in: fp32 under autocast, else the precision's."""
    return _dtype("fp32" if autocast_dtype(spec) is not None else spec.precision)


def _quiet_transformers() -> None:
    """No per-file progress bars from transformers while loading and saving."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of {path!r}: {str(e).splitlines()[0]}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_module(spec: Model, path: str):
    """The bare Hugging Face module for ``spec.head``: causal LM, token values, or sequence score."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    kw: dict[str, Any] = {"dtype": _weight_dtype(spec)}
    try:
        if spec.head == "lm" or (spec.head == "reward" and spec.reward_from == "likelihood"):
            return AutoModelForCausalLM.from_pretrained(path, **kw)
        config = AutoConfig.from_pretrained(path)
        config.num_labels = 1
        if spec.head == "value":
            config.classifier_dropout = 0.0  # a scalar per position, no dropout on the value head
            return AutoModelForTokenClassification.from_pretrained(path, config=config, **kw)
        return AutoModelForSequenceClassification.from_pretrained(path, config=config, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load model {spec.path!r} from {path!r}: {str(e).splitlines()[0]}") from e


def disable_dropout(module) -> None:
    """Dropout off everywhere (as TRL's ``disable_dropout``): sampling, old, current and
    reference log-probs must come from the same deterministic function, or the ratio is noise."""
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "classifier_dropout"):
        if isinstance(getattr(module.config, key, None), float):
            setattr(module.config, key, 0.0)


def with_adapter(module, name: str, spec: Model):
    """``module`` inside a ``peft`` model with a fresh LoRA adapter (``spec.lora``): every
    base weight frozen, only the adapter's ``A`` and ``B`` matrices trainable."""
    import warnings

    from peft import LoraConfig, get_peft_model

    lora = spec.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                        lora_dropout=lora.dropout, bias="none", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question on every wrap
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(module, config)
    except ValueError as e:  # target modules not in the model, ...
        raise ModelLoadError(f"model {name!r}: lora.target_modules={lora.target_modules!r}: "
                             f"{str(e).splitlines()[0]}") from e


def merged_state_dict(module) -> dict[str, Any]:
    """The weights of a ``peft`` LoRA model with its (one, active) adapter merged in
    (``W + (alpha/r) B A``, computed by peft's own ``get_delta_weight``), under the base
    model's own names: what ``from_pretrained`` of the base architecture loads. The module
    is not changed (peft's ``merge_and_unload`` would merge into it for good)."""
    import torch
    from peft.tuners.lora import LoraLayer

    base = module.get_base_model()
    deltas = {f"{n}.base_layer.weight": m.get_delta_weight(a) for n, m in base.named_modules()
              if isinstance(m, LoraLayer) for a in m.active_adapters if not m.merged}
    out = {}
    with torch.no_grad():
        for key, value in base.state_dict().items():
            if ".lora_" in key:
                continue
            if key in deltas:
                value = value + deltas[key].to(value.dtype)
            out[key.replace(".base_layer.", ".")] = value
    return out


def _save_adapter(module, directory: Path) -> None:
    """A peft model's adapter alone: ``adapter_config.json`` and ``adapter_model.safetensors``
    (peft's template model card, all "More Information Needed", is left out)."""
    module.save_pretrained(directory, safe_serialization=True)
    (directory / "README.md").unlink(missing_ok=True)


NO_CLIP = 1e30  # a clip that never binds: DeepSpeed then still computes the norm (and skips a non-finite step)


def fuse_activations(module) -> int:
    """Swap GPT-2's ``gelu_new`` and ``gelu_fast`` (tanh-GELU written as five elementwise ops)
    for torch's one-kernel tanh-GELU, the same formula (transformers' ``GELUTanh``: equal up to
    float rounding, ~1e-7). On a small model those ops took a quarter of the step. The number
    of modules swapped."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def _clips_itself(spec: Model) -> bool:
    """Whether the worker (not DeepSpeed) clips gradients: plain fp32 weights under ZeRO-0 only."""
    return spec.zero_stage == 0 and _weight_dtype(spec) == _dtype("fp32")


@dataclass
class Worker:
    """One placed model: its DeepSpeed engine, the bare module, and its tokenizer."""

    name: str
    spec: Model
    engine: Any  # DeepSpeedEngine (trainable, or frozen under ZeRO-3) or InferenceEngine (frozen)
    module: Any  # the Hugging Face module inside the engine
    tokenizer: Any
    path: str
    device: Any = None  # where the model computes: every batch it reads is moved here (ModelRunner.inputs)
    base_of: Optional[str] = None  # the LoRA model whose module this is, run with its adapter disabled

    @property
    def trainable(self) -> bool:
        return self.spec.train

    @property
    def lora(self) -> bool:
        """Whether this worker trains a LoRA adapter (its module is a ``peft`` model)."""
        return self.spec.train and self.spec.lora is not None

    def forwards(self):
        """The context every forward of this model runs in: for a LoRA model's shared base,
        the module with its adapter disabled (peft's ``disable_adapter``); else nothing.
        The adapter is off for the whole context, so the LoRA model itself must not run
        inside it (the engine runs nodes one at a time)."""
        import contextlib

        return self.module.disable_adapter() if self.base_of else contextlib.nullcontext()

    def base_view(self, name: str, spec: Model) -> "Worker":
        """The worker of ``spec``, a frozen model that is this LoRA model's base: the same
        engine, module, tokenizer and device, nothing loaded (``forwards`` disables the adapter)."""
        return Worker(name, spec, self.engine, self.module, self.tokenizer, self.path, self.device, base_of=self.name)

    def backward(self, loss, *, last: bool) -> None:
        """Accumulate gradients of one micro-batch; ``last`` marks the mini-batch boundary."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def zero_loss(self):
        """A loss of exactly 0 whose gradient reaches every trainable parameter (as zeros): a
        micro-batch whose loss is not finite still takes part in the backward's collectives."""
        import torch

        params = [p for p in self.module.parameters() if p.requires_grad]
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=self.device))

    def step(self, *, skip: bool = False) -> tuple[Optional[float], bool]:
        """One optimizer step: (the gradient norm before clipping or None if unknown, skipped).

        The step is skipped — gradients dropped, weights, optimizer and scheduler untouched —
        when ``skip`` (the caller saw a non-finite loss) or when the norm computed here is not
        finite. DeepSpeed clips and reports the norm for its ZeRO and mixed-precision
        optimizers; for plain fp32 ZeRO-0 it would clip without keeping the norm, so there the
        clipping is done here (one norm computation) and DeepSpeed is given none (see ``place``).
        """
        import torch

        norm = None
        if not skip and _clips_itself(self.spec):
            clip = self.spec.grad_clip or float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip))
            skip = not math.isfinite(norm)  # the same on every rank: gradients are all-reduced
        if skip:
            self.engine.zero_grad()
            self.engine.optimizer.zero_grad(set_to_none=True)
            return norm, True
        self.engine.step()
        if norm is None:
            reported = self.engine.get_global_grad_norm()
            norm = float(reported) if reported is not None else None
        # DeepSpeed's ZeRO and mixed-precision optimizers skip a step whose norm is not finite
        # themselves (ds_config makes them compute it) and report that norm
        return norm, norm is not None and not math.isfinite(norm)

    def lr(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    def autocast(self, training: bool = True):
        """The context the model's forwards run in: ``torch.autocast`` when its precision is
        autocast on this machine (:func:`autocast_dtype`), else a no-op. For a ``training``
        forward on a CPU it also picks the math attention kernel: the fused (flash) kernel's
        backward in bf16 is slow on CPUs (41.6 ms a call against 4.8 ms in fp32 on the
        benchmark's model: the GRPO step 0.767 s -> 0.652 s with the math kernel, whose
        matmuls autocast runs in bf16); forwards without a backward keep the fused kernel."""
        import contextlib

        import torch

        dtype = autocast_dtype(self.spec)
        if dtype is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=dtype))
        if training:
            stack.enter_context(self.training_kernel())
        return stack

    def training_kernel(self):
        """The attention kernel of a training forward (see :meth:`autocast`): the math kernel
        under bf16 autocast on a CPU, else a no-op. A process-wide switch, not a thread's."""
        import contextlib

        if autocast_dtype(self.spec) is None or self.device.type != "cpu":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])

    def save_pretrained(self, directory: Path) -> None:
        """The model (and tokenizer) as a directory ``from_pretrained`` can load. A LoRA
        model is saved merged (base + adapter), and its adapter alone in ``adapter/``."""
        from rlflow import dist

        if self.lora:
            return self._save_merged(directory)
        state = None
        if self.spec.zero_stage == 3 and self.trainable:  # collective: every rank takes part
            state = self.engine._zero3_consolidated_16bit_state_dict()
        if dist.rank() == 0:  # one writer
            directory.mkdir(parents=True, exist_ok=True)
            self.module.save_pretrained(directory, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)

    def save_trained(self, directory: Path) -> None:
        """What training changed, for a checkpoint: the whole model (``save_pretrained``),
        or of a LoRA model the adapter alone (``PeftModel.from_pretrained`` loads it)."""
        from rlflow import dist

        if not self.lora:
            return self.save_pretrained(directory)
        with self._gathered():  # collective under ZeRO-3
            if dist.rank() == 0:
                directory.mkdir(parents=True, exist_ok=True)
                _save_adapter(self.module, directory)

    def _save_merged(self, directory: Path) -> None:
        from rlflow import dist

        with self._gathered():
            if dist.rank() == 0:
                directory.mkdir(parents=True, exist_ok=True)
                base = self.module.get_base_model()
                base.save_pretrained(directory, state_dict=merged_state_dict(self.module), safe_serialization=True)
                self.tokenizer.save_pretrained(directory)
                _save_adapter(self.module, directory / ADAPTER_DIR)

    def _gathered(self):
        """Under ZeRO-3, every parameter gathered whole on every rank (read only); else nothing."""
        import contextlib

        if self.spec.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)


def place(name: str, spec: Model, *, train: Optional[Train] = None, on_build: Optional[Callable[[str], None]] = None,
          shared: Optional[dict] = None) -> Worker:
    """Load ``spec`` and wrap it with DeepSpeed. ``shared`` caches tokenizers by path;
    ``train`` and ``on_build`` serve a built-in model's first build (see :func:`resolve`)."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    setup_distributed()
    _quiet_transformers()
    path = resolve(spec.path, train=train, on_build=on_build)
    try:
        tokenizer = (shared or {}).get(path) or load_tokenizer(path)
    except ModelLoadError as e:
        raise ModelLoadError(f"model {name!r}: {e}") from e
    if shared is not None:
        shared[path] = tokenizer
    module = load_module(spec, path)
    disable_dropout(module)
    fuse_activations(module)
    if spec.head != "lm" and module.config.pad_token_id is None:
        module.config.pad_token_id = tokenizer.pad_token_id
    if spec.train and spec.lora is not None:
        module = with_adapter(module, name, spec)
    device = torch.device(get_accelerator().current_device_name())
    if not spec.train:
        module.eval()
        module.requires_grad_(False)
        if spec.zero_stage == 3:  # sharded like the trained models, no optimizer (as TRL places a reference)
            engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config(spec, _hidden(module)))
            engine.eval()
        else:
            engine = deepspeed.init_inference(module, dtype=_weight_dtype(spec), replace_with_kernel_inject=False)
        return Worker(name, spec, engine, engine.module, tokenizer, path, device)

    module.train()
    if spec.gradient_checkpointing:  # transformers 5 names it activation checkpointing; 4.x gradient checkpointing
        enable = getattr(module, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = [p for p in module.parameters() if p.requires_grad]  # the adapter alone, with LoRA
    opt = _adamw(spec, trained)
    warm = spec.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_config(spec, _hidden(module)))
    if _clips_itself(spec) and dist.world_size() == 1:
        # one process: DeepSpeed's gradient all-reduce would flatten every gradient into one
        # buffer, "reduce" it over the one rank, divide by 1 and copy it back: the same values
        engine.enable_backward_allreduce = False
    if spec.lora is not None:
        _checkpoint_trained_only(engine)
    return Worker(name, spec, engine, engine.module, tokenizer, path, device)


def _adamw(spec: Model, params):
    """AdamW; DeepSpeed's C++ CPU Adam (the same update, ``adamw_mode``) when the optimizer
    state is offloaded to the CPU, as ZeRO-Offload requires (JIT-built on first use)."""
    import torch

    if spec.offload and spec.zero_stage > 0:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, adamw_mode=True)
    # fused: one kernel for every parameter's update (4x faster than foreach on the CPU; the same maths)
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, fused=True)


def build_ops(cpu_adam: bool = False) -> None:
    """Build DeepSpeed's JIT ops this run needs (the communication op; CPU Adam for offload)
    once, before several processes would build them at the same time."""
    setup_distributed()
    if cpu_adam:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load()


def _hidden(module) -> Optional[int]:
    return getattr(module.config, "hidden_size", None)


def ds_config(spec: Model, hidden: Optional[int] = None) -> dict[str, Any]:
    """The DeepSpeed config of a model: ZeRO stage and offload, precision, gradient clipping.

    With the model's ``hidden`` size, ZeRO's buffers are sized to the model as the Hugging
    Face Trainer's ``"auto"`` values do (reduce bucket H², prefetch bucket 0.9·H², parameters
    under 10·H elements kept whole), not DeepSpeed's fixed defaults (a 5e8-element reduce
    bucket, 2 GB in fp32, and nothing under 1e5 elements sharded)."""
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if hidden and spec.zero_stage >= 2:
        zero["reduce_bucket_size"] = hidden * hidden
    if hidden and spec.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden), stage3_param_persistence_threshold=10 * hidden)
    if spec.train and spec.offload and spec.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    if spec.offload_params and spec.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # the engine splits micro-batches itself
        "gradient_accumulation_steps": 1,  # and marks the accumulation boundary itself
        "zero_optimization": zero,
        "bf16": {"enabled": spec.precision == "bf16" and autocast_dtype(spec) is None},  # autocast: fp32 optimizer
        "fp16": {"enabled": spec.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if spec.train and not _clips_itself(spec):  # with a clip, DeepSpeed computes the norm and skips a non-finite one
        config["gradient_clipping"] = spec.grad_clip or NO_CLIP
    elif spec.train:  # the worker clips (Worker.step); unset, DeepSpeed would clip again at its default, 1.0
        config["gradient_clipping"] = 0.0
    return config


def _checkpoint_trained_only(engine) -> None:
    """Make DeepSpeed's checkpoint of a LoRA model hold its trained (adapter) weights only.

    ``save_checkpoint(exclude_frozen_parameters=True)`` drops frozen parameters by name,
    one name per tensor, so a tied copy (``lm_head.weight`` = ``embed_tokens.weight``, a
    vocabulary-sized matrix) stays in every checkpoint; this drops every name whose
    tensor is not trained."""
    full = engine.module_state_dict

    def trained_only(*args: Any, exclude_frozen_parameters: bool = False, **kw: Any):
        state = full(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kw)
        if exclude_frozen_parameters:
            trained = {n for n, p in engine.module.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in trained]:
                del state[key]
        return state

    engine.module_state_dict = trained_only
