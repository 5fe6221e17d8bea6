"""A pruning job, start to finish: load, calibrate, prune block by block, evaluate, save, verify.

Only one decoder block's weights are materialised at a time; each pruned block is written to its
shard as soon as it is done. Everything is written to a temporary sibling of `out_dir` and renamed
into place only when complete and verified.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from shears.errors import InvalidRequest, OutOfMemory
from shears.progress import Event, Reporter, silent
from shears.pruning.block_pruner import LayerResult, prune_block
from shears.pruning.checkpoint import Checkpoint
from shears.pruning.config import EngineOptions, PruneRequest
from shears.pruning.evaluate import eval_batch_size, finish, split_windows
from shears.pruning.methods import METHODS
from shears.pruning.models import LazyTokenizer, ResolvedModel, check_seqlen, folder_config, resolve_model
from shears.pruning.output import copy_model_files, packable_names, verify_output, write_manifest
from shears.pruning.plan import layer_targets, owl_block_sparsities
from shears.pruning.prunable import Prunable, find_experts
from shears.pruning.resources import PhaseClock, cpu_has_fast_bf16, release_freed_memory, tune_malloc
from shears.pruning.resume import Checkpoints, Progress, identity
from shears.pruning.runtimes import check_configured, verify_folders
from shears.pruning.shards import ShardWriter, TensorSpec, plan_shards
from shears.pruning.skeleton import Skeleton, build_skeleton
from shears.pruning.solvers.reconstruct import refit_matmul_dtype
from shears.pruning.streaming import Batch, advance, capture_inputs, head_logits, run_block

ERROR_SAMPLE_TOKENS = 8192  # calibration tokens the per-block output error is measured on
# Calibration tokens the drift from the dense model (`model_error`) is measured on. They cost a forward
# of the dense block per block (the output error's come free with the statistics pass): at 8,192 that
# was a third of the forwards of a 16 x 512-token job.
DRIFT_SAMPLE_TOKENS = 2048
CPU_FORWARD_TOKENS = 1024  # measured on SmolLM2 blocks: as fast as 4096, a quarter of the peak heap

# Error correction applies to layers that see every token in both models; experts do not (routing differs).
EXPERTS_UNCORRECTED = (
    "not corrected: MoE experts are fitted to their own dense weights on their routed tokens, since "
    "the dense and the pruned model route tokens differently (layers' 'corrected' says which were)"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("device 'cuda' requested but no CUDA GPU is available here; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def prune(
    request: PruneRequest,
    out_dir: Path,
    *,
    reporter: Reporter | None = None,
    options: EngineOptions | None = None,
    checkpoints: Checkpoints | None = None,
) -> dict[str, Any]:
    """Run the job described by `request`, writing a Hugging Face folder to `out_dir`.

    Returns the manifest (also written as out_dir/manifest.json). With `checkpoints` (pruning.resume)
    the job continues from the last block a previous attempt finished, and checkpoints each block;
    its partial output then stays when the job is interrupted (the caller removes it when the job
    is over).
    """
    tune_malloc()
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise InvalidRequest(f"output folder {str(out_dir)!r} already exists; choose a new one")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if checkpoints is not None:
        work = checkpoints.work
    else:
        work = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
        work.mkdir()
    try:
        job_class: type[_Job] = _Job
        if request.structure is not None:
            from shears.pruning.structure.job import StructuredJob

            job_class = StructuredJob
        manifest = job_class(request, work, reporter or silent, options or EngineOptions(), checkpoints).run()
        os.replace(work, out_dir)
        if checkpoints is not None:
            checkpoints.reset()  # the job is done: nothing left to resume
        fd = os.open(out_dir.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return manifest
    except torch.OutOfMemoryError as exc:
        raise OutOfMemory(f"out of GPU memory: {exc}; lower calibration.batch_size or samples") from exc
    finally:
        if checkpoints is None:
            shutil.rmtree(work, ignore_errors=True)


class _Job:
    def __init__(
        self,
        request: PruneRequest,
        work: Path,
        reporter: Reporter,
        options: EngineOptions,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        self.request = request
        self.work = work
        self.reporter = reporter
        self.options = options
        self.checkpoints = checkpoints
        self.clock = PhaseClock(reporter)

    def run(self) -> dict[str, Any]:
        request = self.request
        check_configured(request.verify_runtimes, self.options.runtime_pythons)  # refuse before any work
        torch.manual_seed(request.calibration.seed)
        with self.clock.phase("loading", f"loading {request.model}"):
            model, skeleton, tokenizer = self._load()
            targets = layer_targets(skeleton, request)
        shards = plan_shards(self._output_specs(skeleton), self.options.max_shard_bytes)
        writer = ShardWriter(self.work, shards, hashing=self.checkpoints is not None)
        try:
            with self.clock.phase("calibrating"):
                windows, calib, dense_eval, eval_ids = self._calibrate(model, skeleton, tokenizer)
                pruned_eval = [batch.clone() for batch in dense_eval]
                # The dense model's own stream for the same tokens (checkpointed with the others): all
                # of it for error correction (its targets), else the batches the block error samples.
                kept = len(calib) if self._correcting() else _leading_batches(calib, DRIFT_SAMPLE_TOKENS)
                dense_calib = [batch.clone() for batch in calib[:kept]]
                streams = {
                    "calib": calib,
                    "dense_calib": dense_calib,
                    "dense_eval": dense_eval,
                    "pruned_eval": pruned_eval,
                }
                progress = None
                if self.checkpoints is not None:
                    ident = identity(request, model, skeleton, shards)
                    progress = self.checkpoints.resume(ident, writer, streams, targets, self.reporter)
                if progress is None:
                    if request.owl is not None:
                        owl = owl_block_sparsities(skeleton, calib, request)
                        targets = layer_targets(skeleton, request, owl)
                    progress = Progress(0, targets, [], [])
                del tokenizer  # the windows are token ids now
                if not eval_ids:  # nothing left to run through the embeddings or the head
                    skeleton.release_outside()
                release_freed_memory()
            if progress.start == 0:
                self._write_outside(skeleton, writer)
            with self.clock.phase("pruning"):
                layers, blocks = self._prune_blocks(skeleton, progress, streams, writer)
            files = writer.finish()
        finally:
            writer.abort()
        perplexity = None
        if eval_ids:
            with self.clock.phase("evaluating"):
                before = finish(skeleton, eval_ids, dense_eval)
                after = finish(skeleton, eval_ids, pruned_eval)
                perplexity = {
                    "dense": before.ppl,
                    "pruned": after.ppl,
                    "seqlen": before.seqlen,
                    "tokens": before.tokens,
                    "windows": before.windows,
                    "nll_dense": before.nll,
                    "nll_pruned": after.nll,
                }
        with self.clock.phase("saving"):
            copy_model_files(model.path, self.work, self._output_dtype(skeleton))
            pruned_names = packable_names(layers, skeleton.keymap)
            packed: list[str] = []
            if "packed" in request.formats:
                from shears.kernels.sparse_file import pack_folder

                packed = pack_folder(
                    self.work, request.pattern.nm, pruned_names, max_shard_bytes=self.options.max_shard_bytes
                )
        with self.clock.phase("verifying"):
            verify_output(self.work, layers, request.pattern, skeleton.keymap)
        benchmark = None
        if request.benchmark:
            with self.clock.phase("benchmarking"):
                from shears.kernels.bench import run_benchmark

                benchmark = run_benchmark(
                    self.work, self.reporter, pattern=request.pattern.nm, names=pruned_names
                )
        compatibility = self._compatibility()
        manifest = write_manifest(
            self.work,
            request=request,
            model=model,
            skeleton=skeleton,
            windows_info=windows,
            layers=layers,
            blocks=blocks,
            perplexity=perplexity,
            weight_files=files,
            packed_files=packed,
            benchmark=benchmark,
            compatibility=compatibility,
            clock=self.clock.summary(),
            attempts=self.checkpoints.attempts if self.checkpoints is not None else None,
            solver=self._solver(skeleton.device),
        )
        self.reporter(Event("result", message="done", data={"perplexity": perplexity}))
        return manifest

    def _compatibility(self) -> dict[str, Any] | None:
        """The manifest's `compatibility` section: the output loaded in each asked-for runtime."""
        if not self.request.verify_runtimes:
            return None
        with self.clock.phase(
            "compatibility", f"loading the output in {', '.join(self.request.verify_runtimes)}"
        ):
            return self._verify_runtimes()

    def _verify_runtimes(self) -> dict[str, Any]:
        scratch = str(self.work.resolve())  # renamed to the output folder once the job is done

        def log(message: str) -> None:
            message = message.replace(scratch, "the output")
            self.reporter(Event("log", phase="compatibility", message=message))

        sections = verify_folders(
            [self.work], self.request.verify_runtimes, self.options.runtime_pythons, log=log
        )
        return next(iter(sections.values()))

    def _load(self) -> tuple[ResolvedModel, Skeleton, LazyTokenizer]:
        request = self.request
        model = resolve_model(request.model, request.revision, self.options)
        config = folder_config(model.path)
        if config is not None:  # before any work: windows longer than the model's positions
            check_seqlen(
                config,
                request.calibration.seqlen,
                request.evaluation.seqlen if request.evaluation.enabled else None,
            )
        device = pick_device(request.device)
        checkpoint = Checkpoint(model.path)  # read the shard headers once
        skeleton = build_skeleton(
            model.path,
            device=device,
            dtype=self._compute_dtype(checkpoint, device),
            trust_remote_code=self.options.trust_remote_code,
            checkpoint=checkpoint,
        )
        return model, skeleton, LazyTokenizer(model.path, self.options.trust_remote_code)

    def _compute_dtype(self, checkpoint: Checkpoint, device: torch.device) -> torch.dtype:
        """The dtype of block forwards (statistics stay fp32 and solves run on the stored weights)."""
        if self.request.compute_dtype != "auto":
            return _DTYPES[self.request.compute_dtype]
        if device.type == "cpu" and not cpu_has_fast_bf16():
            return torch.float32
        source = checkpoint.dominant_dtype()
        return torch.float16 if source == torch.float16 and device.type == "cuda" else torch.bfloat16

    def _output_dtype(self, skeleton: Skeleton) -> torch.dtype | None:
        return None if self.request.dtype == "auto" else _DTYPES[self.request.dtype]

    def _calibrate(
        self, model: ResolvedModel, skeleton: Skeleton, tokenizer: LazyTokenizer
    ) -> tuple[dict[str, Any], list[Batch], list[Batch], list[torch.Tensor]]:
        from shears.calibration.windows import iter_batches, load_windows
        from shears.pruning.generate import self_sampler

        request = self.request
        evaluation = request.evaluation if request.evaluation.enabled else None
        generate = self_sampler(model.path, skeleton.device, skeleton.dtype)
        uploads = Path(self.options.uploads_dir) if self.options.uploads_dir else None
        windows = load_windows(
            request.calibration,
            evaluation,
            tokenizer,
            uploads_dir=uploads,
            generate=generate,
            allow_local_paths=self.options.allow_local_paths,
            vocab_size=skeleton.model.get_input_embeddings().weight.shape[0],
        )
        store = skeleton.device
        calib: list[Batch] = []
        # A structure always needs the calibration inputs (its statistics, the block output error).
        method = METHODS.get(request.method)
        reads_inputs = method is not None and method.statistic_of(request.method_options) != "none"
        if reads_inputs or request.owl is not None or request.structure is not None:
            batch_size = request.calibration.batch_size
            if store.type == "cpu":
                # Sums of statistics do not depend on the batching; a CPU forward's temporaries
                # (and the heap they fragment) grow with its token count, its speed does not.
                batch_size = max(1, min(batch_size, CPU_FORWARD_TOKENS // windows.calibration.shape[1]))
            windows.info["forward_batch_size"] = batch_size
            calib = capture_inputs(skeleton, iter_batches(windows.calibration, batch_size), store)
        eval_ids: list[torch.Tensor] = []
        dense_eval: list[Batch] = []
        if windows.evaluation is not None:
            vocab = skeleton.model.get_output_embeddings().out_features
            eval_ids = split_windows(windows.evaluation, eval_batch_size(windows.evaluation.shape[1], vocab))
            dense_eval = capture_inputs(skeleton, eval_ids, store)
            # The head runs only after pruning: check now, before any work, that it runs at all.
            head_logits(skeleton, eval_ids[0][:1, :8], dense_eval[0].hidden[:1, :8])
        return windows.info, calib, dense_eval, eval_ids

    def _output_specs(self, skeleton: Skeleton) -> list[TensorSpec]:
        """Every checkpoint tensor, under its own name: the outside ones first, then block by block."""
        checkpoint = skeleton.checkpoint
        dtype = self._output_dtype(skeleton)
        specs = []
        for name in skeleton.outside_keys() + [
            k for i in range(skeleton.num_blocks) for k in skeleton.block_keys(i)
        ]:
            source = checkpoint.dtypes[name]
            out = dtype if dtype is not None and source.is_floating_point else source
            specs.append(TensorSpec(name, out, checkpoint.shapes[name]))
        return specs

    def _write_outside(self, skeleton: Skeleton, writer: ShardWriter) -> None:
        """Embeddings, head, a VLM's vision tower and projector: copied from the checkpoint as they are."""
        for name in skeleton.outside_keys():  # one at a time: a vision tower may be large
            writer.write(name, skeleton.checkpoint.load([name])[name], exact=True)

    def _prune_blocks(
        self, skeleton: Skeleton, progress: Progress, streams: dict[str, list[Batch]], writer: ShardWriter
    ) -> tuple[list[LayerResult], list[dict[str, Any]]]:
        """Blocks from `progress.start` on; a checkpoint after each (with `self.checkpoints`)."""
        device = skeleton.device
        total = skeleton.num_blocks
        targets = progress.targets
        calib, dense_eval, pruned_eval = streams["calib"], streams["dense_eval"], streams["pruned_eval"]
        all_layers, blocks = progress.layers, progress.blocks
        # The block output error is measured on the first ERROR_SAMPLE_TOKENS calibration tokens:
        # holding every batch's dense output would cost a second copy of all activations.
        sampled = _leading_batches(calib, ERROR_SAMPLE_TOKENS)
        dense_out = [torch.empty_like(batch.hidden) for batch in calib[:sampled]]  # reused by every block
        sampled_tokens = sum(batch.hidden.shape[:-1].numel() for batch in calib[:sampled])
        drifted = min(_leading_batches(calib, DRIFT_SAMPLE_TOKENS), len(streams["dense_calib"]))
        drifted_tokens = sum(batch.hidden.shape[:-1].numel() for batch in calib[:drifted])
        correcting = self._correcting()
        dense_stream = streams["dense_calib"]  # calib's tokens through the dense blocks
        for index in range(progress.start, total):
            block = skeleton.materialize_block(index)
            with torch.inference_mode():
                for batch in dense_eval:
                    advance(block, index, batch, device)
                if not correcting:  # while the block is still dense
                    for batch in dense_stream:
                        advance(block, index, batch, device)
                prunables = skeleton.prunables(index)
                layers = {n: p for n, p in prunables.items() if targets[n] is not None}
                chosen = {n: t for n, t in targets.items() if n in layers and t is not None}
                masters = self._masters(skeleton, layers)
                results, measured = prune_block(
                    block,
                    index,
                    layers,
                    chosen,
                    masters,
                    calib,
                    self.request,
                    device,
                    dense_out,
                    experts=find_experts(block, f"{skeleton.blocks_prefix}.{index}."),
                    dense_batches=dense_stream if correcting else None,
                )
                squared_error = squared_norm = drift_error = drift_norm = 0.0
                for position, batch in enumerate(calib):
                    out = run_block(block, index, batch, device)
                    if position < drifted:
                        # Out of place: .float() of an fp32 tensor is the tensor itself, and `out`
                        # becomes the next block's input.
                        model = dense_stream[position].hidden.float()
                        drift_error += float((out.float() - model).square().sum())
                        drift_norm += float(model.square().sum())
                        del model
                    if measured and position < sampled:
                        dense = dense_out[position].float()
                        squared_error += float((out.float() - dense).square().sum())
                        squared_norm += float(dense.square().sum())
                    batch.hidden.copy_(out)
                    del out
                for batch in pruned_eval:
                    advance(block, index, batch, device)
            self._write_block(skeleton, index, writer, masters)
            skeleton.release_block(index)
            del masters
            release_freed_memory()
            all_layers += results
            output_error = squared_error / squared_norm if squared_norm else None
            blocks.append(
                {
                    "index": index,
                    "output_error": output_error,
                    "model_error": drift_error / drift_norm if drift_norm else None,
                    "output_error_tokens": sampled_tokens if output_error is not None else 0,
                    "model_error_tokens": drifted_tokens if drift_norm else 0,
                    "seconds": round(sum(r.seconds for r in results), 4),
                }
            )
            if self.checkpoints is not None:  # before the progress event: a block reported is saved
                self.checkpoints.save(index + 1, writer, streams, progress, self.reporter)
            self.reporter(
                Event(
                    "progress",
                    phase="pruning",
                    done=index + 1,
                    total=total,
                    message=f"block {index + 1}/{total}",
                    data={"output_error": output_error},
                )
            )
        return all_layers, blocks

    def _solver(self, device: torch.device) -> dict[str, Any]:
        """The method, its exact variant and parameters, and the error correction if it applied."""
        request = self.request
        method = METHODS.get(request.method)  # None for method 'none' (a structure only)
        if method is None:
            described: dict[str, Any] = {"method": request.method}
        else:
            described = method.describe(request.method_options)
        chosen_dtypes = {"refit_precision": "refit_matmul_dtype", "admm_precision": "admm_matmul_dtype"}
        for option, chosen in chosen_dtypes.items():
            if option in described:  # 'auto' depends on the machine: say what it chose
                dtype = refit_matmul_dtype(described[option], device)
                described[chosen] = str(dtype).removeprefix("torch.")
        correction = request.error_correction
        described["error_correction"] = (
            {**correction.model_dump(), "experts": EXPERTS_UNCORRECTED}
            if self._correcting() and correction
            else None
        )
        return described

    def _correcting(self) -> bool:
        """Whether error correction applies: asked for, a Hessian method, not true sequential."""
        request = self.request
        method = METHODS.get(request.method)
        statistic = method.statistic_of(request.method_options) if method is not None else "none"
        return request.error_correction is not None and statistic == "hessian" and not request.true_sequential

    def _masters(self, skeleton: Skeleton, layers: dict[str, Prunable]) -> dict[str, torch.Tensor]:
        """The parameters holding the layers, as stored (the solve's input; a fused experts parameter
        whole), cast to the output dtype if one is set."""
        params = list(dict.fromkeys(layer.param for layer in layers.values()))
        loaded = skeleton.keymap.load(params, skeleton.device)
        dtype = self._output_dtype(skeleton)
        return {name: tensor.to(dtype or tensor.dtype) for name, tensor in loaded.items()}

    def _write_block(
        self, skeleton: Skeleton, index: int, writer: ShardWriter, pruned: dict[str, torch.Tensor]
    ) -> None:
        """The block's checkpoint tensors in the checkpoint's names and layout: pruned parameters
        converted back (with the rest of their conversion unit), the others copied as they are."""
        keymap = skeleton.keymap
        rest = [name for name in keymap.unit_params(pruned) if name not in pruned]
        converted = keymap.to_checkpoint({**keymap.load(rest), **pruned})
        names = skeleton.block_keys(index)
        originals = skeleton.checkpoint.load([n for n in names if n not in converted])
        for name in names:
            if name in converted:
                writer.write(name, converted[name])
            else:
                writer.write(name, originals[name], exact=True)


def _leading_batches(batches: list[Batch], tokens: int) -> int:
    """How many leading batches hold at most `tokens` tokens (at least one, if there is any)."""
    count = total = 0
    for batch in batches:
        total += batch.hidden.shape[:-1].numel()
        if count and total > tokens:
            break
        count += 1
    return count
