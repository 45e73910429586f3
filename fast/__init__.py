"""The fast layer: everything in this repository that exists only for speed, applied to a built model from
outside. The methods never import it; common.py hands it the model after the adapter is injected (unless
--no-fast) and takes its training step. Deleting this folder leaves every method training the same way,
only slower. How it works, what it assumes and what it gains: fast/README.md.

    apply(model, args, device)   swapped forwards (fused attention with SAM's rel-pos term in Triton
                                 kernels, TinyViT's channels-last layout, one-kernel norms), LoRA's q/v
                                 update inside the qkv matmul, frozen weights in bf16, the checkpoint
                                 policy, compilation started ahead
    training_step(...)           the step replayed from a CUDA graph (CUDA), else common.TrainStep
"""
import torch

import common
from data import UserError
from fast.forwards import TRITON_CAPABILITY, use_fast_forwards
from fast.step import (CHECKPOINT_POLICY, GraphedStep, compile_ahead, configure_compilation,
                       frozen_weights_to_bf16)


def apply(model, args, device):
    """Make a built model (base weights loaded, adapter injected, on `device`) fast, in place."""
    if device.type == "cuda":
        # shapes are fixed within a run: time cuDNN's algorithms once (not where runs must repeat bit for bit)
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
        if torch.cuda.get_device_capability(device) < TRITON_CAPABILITY:
            major, minor = torch.cuda.get_device_capability(device)
            print(f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}, older than the "
                  f"8.0 that Triton's bf16 code needs: attention runs through SDPA, not the Triton kernels, and "
                  f"nothing is compiled (slower)")
    use_fast_forwards(model)
    compiling = common.should_compile(args, device)
    if compiling:
        configure_compilation(model)
    if args.grad_checkpoint:
        common.use_grad_checkpointing(model.image_encoder, policy=CHECKPOINT_POLICY)
    if device.type == "cuda":
        if not args.export_merged:  # an export folds the adapter into fp32 weights
            frozen_weights_to_bf16(model)
        compile_ahead(model, compiling and not (args.eval_only or args.predict))


def training_step(model, loss_fn, optimizer, device):
    """The step train_loop runs: replayed from a CUDA graph on CUDA, common.TrainStep elsewhere."""
    if any(p.dtype != torch.float32 for group in optimizer.param_groups for p in group["params"]):
        raise UserError("a trainable parameter is not float32: the fast layer stored the frozen base weights in "
                        "bf16 before they were unfrozen; unfreeze layers in inject, or pass --no-fast.")
    if device.type == "cuda":
        return GraphedStep(model, loss_fn, optimizer, device)
    return common.TrainStep(model, loss_fn, optimizer, device)
