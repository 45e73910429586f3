"""The training step replayed from a CUDA graph, frozen weights stored in bf16, the checkpoint policy,
and compilation started ahead of the first step."""
import functools
import warnings

import torch
import torch.nn as nn

import common
from data import UserError
from fast.forwards import relpos_kernels


class GraphedStep(common.TrainStep):
    """common.TrainStep captured once as a CUDA graph and then replayed: the GPU gets the whole step's
    kernels in one launch instead of one Python call each, which is what a small model at batch 8 waits on
    (MobileSAM LoRA at batch 8 on an H100: 55-73 ms a step eager, 50 ms replayed).

    What capture needs: inputs copied into the same buffers every step (train_loop's batches have one
    shape), a capturable AdamW whose learning rate is a device tensor (the schedule fills it in place), and
    a loss with no host synchronisation. The first WARMUP steps run eagerly on a side stream (they compile
    what is compiled and let cuDNN choose its algorithms); the last of them runs with PyTorch's sync debug
    mode set to "error", and a loss that synchronises (reads a value back, copies from the host) makes the
    step stay eager for the rest of the run. CPU-side randomness inside a loss would be replayed as it was
    captured; no loss here has any (batches are drawn outside the step, on the device)."""
    WARMUP = 3

    def __init__(self, model, loss_fn, optimizer, device):
        super().__init__(model, loss_fn, optimizer, device)
        self.graph, self.calls, self.capturable = None, 0, True
        for group in optimizer.param_groups:
            group["capturable"] = True
            group["lr"] = torch.tensor(float(group["lr"]), device=device)

    def __call__(self, *batch):
        self.calls += 1
        if not self.capturable:
            return super().__call__(*batch)
        if self.graph is None and self.calls <= self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.checked(batch) if self.calls == self.WARMUP else super().__call__(*batch)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.capture(batch)
        elif [b.shape for b in batch] != [b.shape for b in self.inputs]:
            raise UserError("a training batch changed shape after the step was captured as a CUDA graph; "
                            "pass --no-fast.")
        for static, b in zip(self.inputs, batch):
            static.copy_(b)
        self.graph.replay()
        return self.loss

    def checked(self, batch):
        """One eager step whose loss may not synchronise with the host; if it does, every step stays eager."""
        with warnings.catch_warnings():  # PyTorch calls the mode a prototype: nothing a user can act on
            warnings.simplefilter("ignore", UserWarning)
            torch.cuda.set_sync_debug_mode("error")
        try:
            with common.autocast(self.device):
                loss = self.loss_fn(self.model, *batch)
        except RuntimeError as e:
            if "synchroniz" not in str(e):
                raise
            self.capturable = False
            print("the loss synchronises with the host: training steps run eagerly, not from a CUDA graph")
            torch.cuda.set_sync_debug_mode("default")
            return super().__call__(*batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def capture(self, batch):
        self.inputs = [b.clone() for b in batch]
        self.optimizer.zero_grad(set_to_none=True)  # the gradients then live in the graph's memory
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread allocating pinned memory while the step is captured
        # (streamed data) would otherwise invalidate the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            with common.autocast(self.device):
                loss = self.loss_fn(self.model, *self.inputs)
            loss.backward()
            self.optimizer.step()
        self.loss = loss.detach()


def frozen_weights_to_bf16(model):
    """Store the frozen base weights of linear and convolution layers in bf16, once. Autocast caches casts
    only of weights that require grad, so it would cast every frozen weight again at each use (and inside a
    graphed step, every step). The stored values are the ones autocast makes. Peak memory at batch 8,
    H100: ViT-B LoRA 10.8 -> 10.2 GiB, MobileSAM LoRA 4.6 -> 4.4 GiB.
    Not cast: a layer with trainable parameters of its own (SALT rebuilds its weight as W + delta: W stays
    fp32), anything that trains, adapter entries (checkpoints keep fp32), norms."""
    for prefix, layer in model.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            continue
        own = dict(layer.named_parameters(recurse=False))
        if any(p.requires_grad for p in own.values()):
            continue
        for name, p in own.items():
            if f"{prefix}.{name}" in model.base_keys and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)


def keep_global_attention(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep the outputs of the global blocks' attention kernel ((B, N, heads,
    64) bf16, its log-sum-exp, rel_h and rel_w: 152 MB per ViT-B global block at 1024, batch 8) and recompute
    everything else. ViT-B LoRA at batch 8 on an H200: 3.7 GiB at 86% of the uncheckpointed speed."""
    from torch.utils.checkpoint import CheckpointPolicy
    kernels = relpos_kernels()
    if (kernels is not None and op is torch.ops.peft_sam.relpos_attention.default
            and kernels.by_rows((args[2].shape[0] + 1) // 2)):  # table_w (2W - 1, hd): a global grid
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


CHECKPOINT_POLICY = functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts,
                                      keep_global_attention)


def _input_needs_grad(module, args, out):
    """Forward hook on a ViT's patch embedding: in training, its output is handed on as a leaf that requires
    grad, so that the first block runs the same compiled graph as the other windowed blocks instead of one
    of its own (autograd skips the gradient of an input that needs none, which makes another backward graph).
    The price is that gradient, computed and dropped."""
    if torch.is_grad_enabled() and not out.requires_grad:
        return out.detach().requires_grad_()


def configure_compilation(model):
    """Settings for compiled encoder blocks: pointwise kernels take inductor's default launch configuration
    instead of timing several (27.4 s against 32.5 s of compilation for a ViT-B run, same speed), and the
    first block shares the windowed blocks' graph."""
    import torch._inductor.config
    torch._inductor.config.triton.autotune_pointwise = False
    encoder = model.image_encoder
    if hasattr(encoder, "blocks") and not getattr(encoder.patch_embed, "shares_first_block_graph", False):
        encoder.patch_embed.register_forward_hook(_input_needs_grad)
        encoder.patch_embed.shares_first_block_graph = True


def compile_ahead(model, compiling):
    """Start, in other processes, the compilation that the first training step would do: the attention
    kernels of every shape the blocks use (one child process each) and, when the blocks are compiled,
    inductor's pool of compile workers. Both then overlap the loading of data and the first evaluation."""
    kernels = relpos_kernels()
    encoder = model.image_encoder
    for blk in getattr(encoder, "blocks", ()):
        attn = blk.attn
        if kernels is None or not (attn.fast_relpos and attn.use_rel_pos):
            continue
        rows, cols = (attn.rel_pos_h.shape[0] + 1) // 2, (attn.rel_pos_w.shape[0] + 1) // 2  # tables 2S - 1
        head_dim = attn.proj.in_features // attn.num_heads
        if not kernels.usable_shape(rows, cols, head_dim):
            continue
        if blk.window_size and attn.qkv_tokenwise:  # windows over the whole grid (forwards.vit_block)
            side = encoder.img_size // encoder.patch_embed.proj.kernel_size[0]
            kernels.precompile(attn.num_heads, rows, cols, head_dim, grid=(side, side))
        else:  # the global grid, or padded windows
            kernels.precompile(attn.num_heads, rows, cols, head_dim)
    if compiling:
        try:
            from torch._inductor.async_compile import maybe_warm_pool
        except ImportError:  # a PyTorch without it starts the pool at the first graph
            return
        maybe_warm_pool()
