"""A structured pruning job: remove blocks, channels, head groups or experts, re-fit, then (optionally)
the sparsity method on what remains; write a smaller dense model with a standard config.

Order, block by block (one dense block and its pruned copy in memory):
1. at load, the request's counts are checked against the config (bad requests stop here);
2. with `layers`, a dense pass over all blocks scores them and the removed ones are chosen;
3. for each kept block: head groups (statistics of o_proj's inputs), then MLP channels (of
   down_proj's inputs, with the heads already gone), then experts (REAP), each re-fitting its
   consumer; the block is cut to its new shapes, the sparsity method (if any) runs on the cut
   block, and the calibration and evaluation streams continue through it;
4. the config is rewritten, the folder verified, and the dense and pruned models timed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import Tensor, nn

from shears.progress import Event
from shears.pruning.block_pruner import LayerResult, prune_block
from shears.pruning.checkpoint import Checkpoint, TensorSource
from shears.pruning.config import StructureSpec
from shears.pruning.engine import ERROR_SAMPLE_TOKENS, _Job, _leading_batches
from shears.pruning.evaluate import finish
from shears.pruning.keymap import KeyMap
from shears.pruning.methods import METHODS
from shears.pruning.output import copy_model_files, verify_output, write_manifest
from shears.pruning.plan import layer_targets
from shears.pruning.prunable import Prunable
from shears.pruning.resources import release_freed_memory
from shears.pruning.runtimes import check_configured
from shears.pruning.shards import ShardWriter, TensorSpec, plan_shards
from shears.pruning.skeleton import Skeleton, find_blocks
from shears.pruning.streaming import Batch, advance, run_block
from shears.pruning.structure.bridge import bridge_run, residual_writer
from shears.pruning.structure.layout import ModelLayout, _meta_model, check_kept_block_types, verify_structure
from shears.pruning.structure.plan import plan_structure
from shears.pruning.structure.select import removed_blocks, score_layers
from shears.pruning.structure.speed import compare_speed
from shears.pruning.structure.widths import cut_widths


class StructuredJob(_Job):
    @property
    def spec(self) -> StructureSpec:
        assert self.request.structure is not None
        return self.request.structure

    def run(self) -> dict[str, Any]:
        request = self.request
        check_configured(request.verify_runtimes, self.options.runtime_pythons)  # refuse before any work
        if self.checkpoints is not None:
            # No per-block resume for a structured job yet: an attempt starts over on an empty output.
            self.checkpoints.reset()
        torch.manual_seed(request.calibration.seed)
        with self.clock.phase("loading", f"loading {request.model}"):
            model, skeleton, tokenizer = self._load()
            text = skeleton.config.get_text_config(decoder=True)
            plan = plan_structure(self.spec, _dims(text), text.model_type)
            layout = ModelLayout(model.path, plan, skeleton.checkpoint)
        with self.clock.phase("calibrating"):
            windows, calib, dense_eval, eval_ids = self._calibrate(model, skeleton, tokenizer)
            del tokenizer
        layer_record: dict[str, Any] = {}
        removed: list[int] = []
        if plan.remove_layers:
            with self.clock.phase("calibrating", "scoring blocks for removal"):
                run = plan.remove_layers if self.spec.contiguous else None
                scores = score_layers(skeleton, calib, run)
                removed = removed_blocks(scores, plan.remove_layers, self.spec)
                layer_record = {
                    "criterion": "angular distance across a run"
                    if self.spec.contiguous
                    else "block influence",
                    "influence": [round(v, 6) for v in scores.influence],
                    "run_distance": scores.run_distance,
                    "sample_tokens": scores.sample_tokens or None,
                }
        kept_blocks = [i for i in range(skeleton.num_blocks) if i not in removed]
        check_kept_block_types(layout, kept_blocks)
        pruned = _pruned_skeleton(layout, kept_blocks, skeleton)
        targets = layer_targets(pruned, request) if request.method in METHODS else {}
        if not eval_ids:
            skeleton.release_outside()
        release_freed_memory()
        pruned_eval = [b.clone() for b in dense_eval]
        specs = self._specs(layout, kept_blocks)
        writer = ShardWriter(self.work, plan_shards(specs, self.options.max_shard_bytes))
        try:
            for name, tensor in skeleton.checkpoint.load(layout.outside_names()).items():
                writer.write(name, tensor)
            with self.clock.phase("pruning"):
                blocks, layers = self._blocks(
                    skeleton, layout, pruned, kept_blocks, targets, calib, dense_eval, pruned_eval, writer
                )
            files = writer.finish()
        finally:
            writer.abort()
        perplexity = self._perplexity(skeleton, eval_ids, dense_eval, pruned_eval)
        with self.clock.phase("saving"):
            copy_model_files(model.path, self.work, self._output_dtype(skeleton))
            _write_config(self.work, layout.config_dict(kept_blocks))
        with self.clock.phase("verifying"):
            verify_output(self.work, layers, request.pattern, KeyMap(pruned.model, Checkpoint(self.work)))
            verify_structure(self.work, layout, kept_blocks)
        structure = {
            "plan": {
                "removed_blocks": removed,
                "kept_blocks": kept_blocks,
                "intermediate_size": plan.mlp_keep,
                "num_key_value_heads": plan.kv_keep,
                "num_attention_heads": plan.kv_keep * layout.dims.queries_per_group if plan.kv_keep else None,
                "experts": plan.experts_keep,
            },
            "layers": layer_record or None,
            "blocks": blocks,
            "parameters": _parameters(skeleton.checkpoint.shapes, skeleton.checkpoint.dtypes, specs),
            "bytes": {"before": _weight_bytes(model.path), "after": _weight_bytes(self.work)},
            "speed": None,
        }
        if self.spec.speed:
            with self.clock.phase("benchmarking", "timing the dense and the pruned model"):
                structure["speed"] = compare_speed(
                    model.path, self.work, skeleton.device, skeleton.dtype, structure["bytes"]["before"]
                )
        compatibility = self._compatibility()
        manifest = write_manifest(
            self.work,
            request=request,
            model=model,
            skeleton=skeleton,
            windows_info=windows,
            layers=layers,
            blocks=[
                {k: b[k] for k in ("index", "output_error", "output_error_tokens", "seconds")} for b in blocks
            ],
            perplexity=perplexity,
            weight_files=files,
            packed_files=[],
            benchmark=None,
            compatibility=compatibility,
            clock=self.clock.summary(),
            structure=structure,
        )
        self.reporter(Event("result", message="done", data={"perplexity": perplexity}))
        return manifest

    # -- blocks --------------------------------------------------------------------------------

    def _specs(self, layout: ModelLayout, kept_blocks: list[int]) -> list[TensorSpec]:
        checkpoint = layout.checkpoint
        dtype = self._output_dtype_or_none()
        specs = []
        for name in layout.outside_names():
            specs.append(
                TensorSpec(name, _out_dtype(checkpoint.dtypes[name], dtype), checkpoint.shapes[name])
            )
        for new, old in enumerate(kept_blocks):
            for name, (shape, source) in layout.output_specs(old, new).items():
                specs.append(TensorSpec(name, _out_dtype(source, dtype), shape))
        return specs

    def _output_dtype_or_none(self) -> torch.dtype | None:
        from shears.pruning.engine import _DTYPES

        return None if self.request.dtype == "auto" else _DTYPES[self.request.dtype]

    def _blocks(
        self,
        skeleton: Skeleton,
        layout: ModelLayout,
        pruned: Skeleton,
        kept_blocks: list[int],
        targets: dict[str, float | None],
        calib: list[Batch],
        dense_eval: list[Batch],
        pruned_eval: list[Batch],
        writer: ShardWriter,
    ) -> tuple[list[dict[str, Any]], list[LayerResult]]:
        device = skeleton.device
        sampled = _leading_batches(calib, ERROR_SAMPLE_TOKENS)
        dense_out = [torch.empty_like(batch.hidden) for batch in calib[:sampled]]
        scratch = [torch.empty_like(batch.hidden) for batch in calib[:sampled]]
        sampled_tokens = sum(batch.hidden.shape[:-1].numel() for batch in calib[:sampled])
        new_index = {old: new for new, old in enumerate(kept_blocks)}
        records: list[dict[str, Any]] = []
        results: list[LayerResult] = []
        for index in range(skeleton.num_blocks):
            if index not in new_index and not dense_eval:
                self._progress(index, skeleton.num_blocks)
                continue  # a removed block: the pruned streams pass it unchanged
            block = skeleton.materialize_block(index)
            with torch.inference_mode():
                for batch in dense_eval:
                    advance(block, index, batch, device)
            if index not in new_index:
                skeleton.release_block(index)
                self._progress(index, skeleton.num_blocks)
                continue
            new = new_index[index]
            tensors = skeleton.checkpoint.load(layout.block_names(index))
            record: dict[str, Any] = {"index": index, "new_index": new}
            kept, measured = cut_widths(
                layout, index, block, tensors, calib, dense_out, self.spec, device, record
            )
            skeleton.release_block(index)
            sliced = layout.slice_block(index, new, tensors, kept)
            del tensors
            cut = _load_block(pruned, layout, new, sliced)
            run = _run_after(index, new_index, skeleton.num_blocks)
            if self.spec.layer_refit and run:
                record["layer_refit"] = self._bridge(
                    cut, index, pruned, layout, new, run, skeleton, calib, sliced
                )
            if targets:
                chosen, linears, masters = self._sparsity_layers(pruned, layout, new, targets, sliced)
                outputs = scratch if measured else dense_out
                layer_results, dense_known = prune_block(
                    cut, index, linears, chosen, masters, calib, self.request, device, outputs
                )
                measured = measured or dense_known
                for param, weight in masters.items():
                    sliced[_checkpoint_name(pruned, layout, param)] = weight
                results += layer_results
            record["output_error"] = self._advance(
                cut, index, calib, pruned_eval, dense_out if measured else None, sampled
            )
            record["output_error_tokens"] = sampled_tokens if measured else 0
            record["seconds"] = round(record.get("seconds", 0.0), 4)
            if dense_eval:
                record["stream_error"] = _stream_error(dense_eval, pruned_eval)
            for name, tensor in sliced.items():
                writer.write(name, tensor)
            pruned.release_block(new)
            del sliced, cut
            release_freed_memory()
            records.append(record)
            self._progress(index, skeleton.num_blocks, record["output_error"])
        return records, results

    def _bridge(
        self,
        cut: nn.Module,
        index: int,
        pruned: Skeleton,
        layout: ModelLayout,
        new: int,
        run: list[int],
        skeleton: Skeleton,
        calib: list[Batch],
        sliced: dict[str, Tensor],
    ) -> dict[str, Any]:
        """Re-fit the cut block's residual writer to carry the removed run that follows it."""
        writer = residual_writer(cut, calib[0].hidden.shape[-1])
        if writer is None:
            return {"run": run, "skipped": "no linear layer writes the residual stream"}
        weight, record = bridge_run(cut, index, writer, skeleton, run, calib, self.spec.damp)
        if weight is not None:
            layer = cut.get_submodule(writer)
            layer.weight.data.copy_(weight.to(layer.weight.dtype))
            name = _checkpoint_name(pruned, layout, f"{pruned.blocks_prefix}.{new}.{writer}.weight")
            sliced[name] = weight.to(sliced[name].dtype).cpu()
        return record

    def _progress(self, index: int, total: int, error: float | None = None) -> None:
        self.reporter(
            Event(
                "progress",
                phase="pruning",
                done=index + 1,
                total=total,
                message=f"block {index + 1}/{total}",
                data={"output_error": error},
            )
        )

    def _sparsity_layers(
        self,
        pruned: Skeleton,
        layout: ModelLayout,
        new: int,
        targets: dict[str, float | None],
        sliced: dict[str, Tensor],
    ) -> tuple[dict[str, float], dict[str, Prunable], dict[str, Tensor]]:
        """The cut block's linear layers to sparsify (experts stay as cut), and their weights by
        parameter name (what prune_block solves on)."""
        linears = {
            n: p for n, p in pruned.prunables(new).items() if p.expert is None and targets.get(n) is not None
        }
        chosen = {n: float(targets[n]) for n in linears}  # type: ignore[arg-type]
        dtype = self._output_dtype_or_none()
        masters = {}
        for layer in linears.values():
            weight = sliced[_checkpoint_name(pruned, layout, layer.param)].to(self._device)
            masters[layer.param] = weight.to(dtype or weight.dtype)
        return chosen, linears, masters

    @torch.inference_mode()
    def _advance(
        self,
        block: nn.Module,
        index: int,
        calib: list[Batch],
        pruned_eval: list[Batch],
        dense: list[Tensor] | None,
        sampled: int,
    ) -> float | None:
        """Move the calibration and evaluation streams through the pruned block; the relative
        output error against the dense block on the leading calibration batches."""
        squared_error = squared_norm = 0.0
        for position, batch in enumerate(calib):
            out = run_block(block, index, batch, self._device)
            if dense is not None and position < sampled:
                reference = dense[position].float()
                squared_error += float((out.float() - reference).square().sum())
                squared_norm += float(reference.square().sum())
            batch.hidden.copy_(out)
        for batch in pruned_eval:
            advance(block, index, batch, self._device)
        return squared_error / squared_norm if squared_norm else None

    def _perplexity(
        self, skeleton: Skeleton, eval_ids: list[Tensor], dense_eval: list[Batch], pruned_eval: list[Batch]
    ) -> dict[str, Any] | None:
        if not eval_ids:
            return None
        with self.clock.phase("evaluating"):
            before = finish(skeleton, eval_ids, dense_eval)
            after = finish(skeleton, eval_ids, pruned_eval)
        return {
            "dense": before.ppl,
            "pruned": after.ppl,
            "seqlen": before.seqlen,
            "tokens": before.tokens,
            "windows": before.windows,
            "nll_dense": before.nll,
            "nll_pruned": after.nll,
        }

    def _load(self) -> Any:
        loaded = super()._load()
        self._device = loaded[1].device
        return loaded


# -- helpers ------------------------------------------------------------------------------------


def _dims(text_config: Any) -> Any:
    from shears.pruning.structure.plan import dimensions

    return dimensions(text_config)


def _run_after(index: int, kept: dict[int, int], total: int) -> list[int]:
    """The removed blocks right after block `index` (empty if the next block is kept)."""
    run = []
    for following in range(index + 1, total):
        if following in kept:
            break
        run.append(following)
    return run


def _out_dtype(source: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    return requested if requested is not None and source.is_floating_point else source


def _pruned_skeleton(layout: ModelLayout, kept_blocks: list[int], dense: Skeleton) -> Skeleton:
    """The pruned model on the meta device; its blocks are filled one at a time from cut tensors."""
    config = layout.pruned_config(kept_blocks)
    model = _meta_model(config)
    model.eval()
    prefix, blocks = find_blocks(model, len(kept_blocks))
    # The dense key map: the pruned skeleton's blocks are filled from cut tensors (_load_block),
    # never read through it.
    return Skeleton(model, config, dense.checkpoint, dense.keymap, blocks, prefix, dense.device, dense.dtype)


def _checkpoint_name(pruned: Skeleton, layout: ModelLayout, module_name: str) -> str:
    """A pruned block's module parameter name -> its checkpoint name (the prefixes may differ)."""
    return layout.checkpoint_prefix + module_name[len(pruned.blocks_prefix) :]


def _load_block(pruned: Skeleton, layout: ModelLayout, new: int, tensors: dict[str, Tensor]) -> nn.Module:
    """Fill pruned block `new` with its cut checkpoint tensors, in the compute dtype. The tensors
    go through transformers' conversions as from_pretrained would load them (per-expert tensors
    become the fused experts parameters)."""
    block = pruned.blocks[new]
    keymap = KeyMap(pruned.model, TensorSource(tensors, layout.checkpoint.folder))
    if keymap.unmapped:
        raise RuntimeError(f"cannot load {keymap.unmapped[:3]} into the pruned block (no such parameter)")
    prefix = f"{pruned.blocks_prefix}.{new}."
    params = dict(block.named_parameters())
    loaded = keymap.load(keymap.params)
    outside = [name for name in loaded if not name.startswith(prefix) or name[len(prefix) :] not in params]
    unset = sorted(set(params) - {name[len(prefix) :] for name in loaded})
    if outside or unset:
        raise RuntimeError(f"the cut tensors of block {new} load into {outside[:3]} and miss {unset[:3]}")
    for name, tensor in loaded.items():
        set_module_tensor_to_device(
            block, name[len(prefix) :], pruned.device, value=tensor, dtype=pruned.dtype
        )
    block.to(pruned.device)
    return block


def _stream_error(dense: list[Batch], pruned: list[Batch]) -> float:
    """Relative distance between the pruned and the dense model's hidden states on the evaluation text."""
    error = norm = 0.0
    for a, b in zip(dense, pruned, strict=True):
        error += float((a.hidden.float() - b.hidden.float()).square().sum())
        norm += float(a.hidden.float().square().sum())
    return error / norm if norm else 0.0


def _parameters(
    shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype], specs: list[TensorSpec]
) -> dict[str, int]:
    before = sum(int(torch.Size(s).numel()) for n, s in shapes.items() if dtypes[n].is_floating_point)
    after = sum(int(torch.Size(s.shape).numel()) for s in specs if s.dtype.is_floating_point)
    return {"before": before, "after": after}


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors") if not p.name.startswith("sparse"))


def _write_config(folder: Path, data: dict[str, Any]) -> None:
    """The rewritten config, keeping a dtype the copy step recorded."""
    copied = json.loads((folder / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        if key in copied:
            data[key] = copied[key]
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
