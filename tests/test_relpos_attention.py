"""fast/relpos_attention.py, the Triton kernels of ViT's attention: through fast.forwards.vit_attention they
must give stock SAM's attention with its decomposed rel-pos term, forward and backward (block input, qkv
and proj weights, both rel-pos tables, LoRA). On the CPU the kernels run under Triton's interpreter in a
subprocess that the module's tests share (Interpreter; TRITON_INTERPRET is read when the kernels are
defined, so it must be set before the import); on CUDA they run compiled, in fp32 and in bf16."""
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import common
from fast import forwards
from test_fast import fast_copy, make_fast, method_model, vit_attention, vit_encoder

pytest.importorskip("triton", reason="PyTorch without Triton: the kernels are not used, the folded path is")

TOL = 1e-5  # fp32, as the folded path (test_fast.TOL); measured ~2e-6 under the interpreter
# (grid rows, grid columns, LoRA rank): the row kernels on a square grid and on rows != columns (query blocks
# of several grid rows), and on a grid 64 wide (each query block within one grid row: rel_h from one slice of
# the table); the window kernels on ViT's 14 x 14 window (the one-kernel backward: 196 queries in a tile of
# 256, keys in blocks, the last one part padding) and on a 5 x 7 grid (less than one block, rows != columns),
# and on an 18 x 18 grid (324 tokens, more than relpos_attention.WHOLE_WINDOW: the split backward kernels)
CASES = [(16, 16, 0), (8, 16, 4), (4, 64, 0), (14, 14, 4), (5, 7, 0), (18, 18, 0)]


def grads(attn, x, g):
    y = attn(x)
    return [y, *torch.autograd.grad(y, [x, *(p for p in attn.parameters() if p.requires_grad)], g)]


def relative_errors(got, want):
    """Max |got - want| of each output or gradient, over max(1, max |want|); want in fp32."""
    return [(a.float() - b).abs().max().item() / max(1.0, b.abs().max().item()) for a, b in zip(got, want)]


def errors(H, W, lora_rank, device, dtype, frozen_tables=False):
    """Max |kernel - stock| over the output and every gradient, stock in fp32; and the same for the folded
    SDPA form in `dtype` (the path the kernels replace), as a yardstick for bf16. The rel-pos tables train
    (their gradient checked too) unless frozen_tables, as our methods have them."""
    stock = vit_attention(0, lora_rank, grid=(H, W)).to(device)
    stock.rel_pos_h.requires_grad_(not frozen_tables)
    stock.rel_pos_w.requires_grad_(not frozen_tables)
    kernel = fast_copy(stock)
    assert kernel.fast_relpos, "the kernels were not picked up"
    folded = fast_copy(stock)
    folded.fast_relpos = False
    x = torch.randn(2, H, W, 128, device=device, requires_grad=True)
    g = torch.randn(2, H, W, 128, device=device)
    want = grads(stock, x, g)
    with torch.autocast(device.type if isinstance(device, torch.device) else device, dtype=dtype,
                        enabled=dtype != torch.float32):
        got = grads(kernel, x, g)
        yardstick = grads(folded, x, g)
    return relative_errors(got, want), relative_errors(yardstick, want)


def checkpointed(device, window=0):
    """A ViT block (16 x 16 grid, heads 64 wide, LoRA; global, or windowed with `window`) on the fast path,
    plain and with activation checkpointing: max |grad difference| over the input and parameters, and how
    often the attention kernel ran in each forward + backward (checkpointing keeps a global block's output:
    once, not twice; a windowed block's is recomputed)."""
    import copy
    from segment_anything.modeling.image_encoder import Block
    from torch.utils._python_dispatch import TorchDispatchMode
    import lora
    from fast.step import CHECKPOINT_POLICY
    from test_fast import randomise

    class CountKernel(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountKernel.calls += func is torch.ops.peft_sam.relpos_attention.default
            return func(*args, **(kwargs or {}))
    torch.manual_seed(0)
    plain = Block(128, num_heads=2, use_rel_pos=True, window_size=window, input_size=(16, 16))
    plain.attn.qkv = lora.LoRAQKV(plain.attn.qkv, 4)
    randomise(plain)
    ckpt = copy.deepcopy(plain)
    grads, calls = [], []
    for blk, checkpoint in ((plain, False), (ckpt, True)):
        encoder = vit_encoder(blk.to(device))
        make_fast(encoder)
        if checkpoint:  # as fast.apply does for --grad-checkpoint: with the fast layer's policy
            common.use_grad_checkpointing(encoder, policy=CHECKPOINT_POLICY)
        x = torch.randn(2, 16, 16, 128, device=device, generator=torch.Generator(device).manual_seed(1),
                        requires_grad=True)
        CountKernel.calls = 0
        with CountKernel():
            y = blk(x)
            grads.append(torch.autograd.grad(y, [x, *blk.parameters()], torch.ones_like(y)))
        calls.append(CountKernel.calls)
    return max((a - b).abs().max().item() for a, b in zip(*grads)), calls


def windowed_block_errors(grid, window, adapter, dtype=torch.float32, device="cpu"):
    """A windowed ViT block (2 heads of 64) on a grid of `grid` tokens, fast path in `dtype` against stock in
    fp32: max |fast - stock| over the output and the gradients of the input and of every parameter (20 with
    LoRA), the qkv bias and both rel-pos tables training (the bias gets the padding keys' gradient); how
    often stock's window_partition ran (0: no padding, fast.forwards.vit_window_attention); and for bf16 stock's own
    errors in bf16. adapter: "none", "lora" (tokenwise), "atrous" (AtrousLoRA: not tokenwise, the padded
    windows)."""
    import copy
    import segment_anything.modeling.image_encoder as vit
    import atrous_lora
    import lora
    from test_fast import randomise
    torch.manual_seed(0)
    stock = vit.Block(128, num_heads=2, use_rel_pos=True, window_size=window, input_size=(window, window))
    if adapter == "lora":
        stock.attn.qkv = lora.LoRAQKV(stock.attn.qkv, 4)
    elif adapter == "atrous":
        stock.attn.qkv = atrous_lora.AtrousLoRAQKV(stock.attn.qkv, 4, (1, 2))
    randomise(stock)
    stock.attn.qkv.bias.data.normal_()  # a visible bias: the padding keys' k and v
    stock.to(device)
    fast = copy.deepcopy(stock)
    make_fast(vit_encoder(fast))
    assert type(fast).__name__ == "FastBlock" and fast.attn.fast_relpos, "the fast path was not picked up"
    assert fast.attn.qkv_tokenwise == (adapter != "atrous")  # fast.forwards.is_tokenwise's probe
    x = torch.randn(2, *grid, 128, device=device, requires_grad=True)
    g = torch.randn(2, *grid, 128, device=device)

    def run(blk, dtype):
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            return grads(blk, x, g)
    want = run(stock, torch.float32)
    partition, calls = vit.window_partition, []
    vit.window_partition = lambda *a: calls.append(1) or partition(*a)
    try:
        got = run(fast, dtype)
    finally:
        vit.window_partition = partition
    if dtype == torch.float32:
        return relative_errors(got, want), len(calls)
    # and stock's own in dtype, as a yardstick
    return relative_errors(got, want), len(calls), relative_errors(run(stock, dtype), want)


def errors_where_the_whole_window_does_not_fit(H, W):
    """errors() with the one-kernel window backward refusing to launch as Triton does where its tiles need
    more shared memory than the GPU has; and the (device, dtype) pairs relpos_attention then noted."""
    from fast import relpos_attention as ra
    from triton.runtime.errors import OutOfResources

    class NoRoom:  # _window_backward_dq, refusing its WHOLE launches
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["WHOLE"]:
                    raise OutOfResources(172032, 101376, "shared memory")
                return kernel[grid](*args, **kwargs)
            return launch
    kernel, ra._window_backward_dq = ra._window_backward_dq, NoRoom()
    try:
        return errors(H, W, 4, "cpu", torch.float32)[0], [str(key) for key in ra._SPLIT_ONLY]
    finally:  # as before, for the next test in the same process
        ra._window_backward_dq = kernel
        ra._SPLIT_ONLY.clear()


def backward_nodes(H, W):
    """Names of the autograd nodes of a ViT attention (an H x W grid, no adapter: LoRA's own transposes are
    permutes too) through the kernels, from its output back to its input."""
    kernel = fast_copy(vit_attention(0, 0, grid=(H, W)))
    assert kernel.fast_relpos, "the kernels were not picked up"
    seen, todo = set(), [kernel(torch.randn(2, H, W, 128, requires_grad=True)).grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [parent for parent, _ in node.next_functions]
    return sorted({node.name() for node in seen})


class Interpreter:
    """A Python with Triton's interpreter on, kept for this module's tests: its start-up (importing torch and
    Triton, the kernels' first launch) took about 8 s of every test's run on a 2-core CPU when each test had a
    process of its own. A call sends an expression over this module (`t`) and returns its value, from its
    repr; an error raised there fails the calling test with the child's traceback."""
    MARK = "@@value@@ "  # starts the line that carries a call's value; other lines are the child's output

    def __init__(self):
        code = (f"import sys, traceback; sys.path[:0] = [{str(Path(__file__).parent)!r}, "
                f"{str(Path(__file__).parents[1])!r}]\n"
                "import torch, test_relpos_attention as t\n"
                "for line in sys.stdin:\n"
                "    try:\n"
                "        value = 'ok ' + repr(eval(line))\n"
                "    except BaseException:\n"
                "        value = 'error ' + repr(traceback.format_exc())\n"
                f"    print({self.MARK!r} + value, flush=True)\n")
        self.child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
        self.lines = queue.Queue()  # the child's output, read by a thread so that a wait can time out
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.child.stdout:
            self.lines.put(line)
        self.lines.put(None)  # the child exited

    def __call__(self, call, timeout=300):
        self.child.stdin.write(call + "\n")
        self.child.stdin.flush()
        output = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                self.child.kill()
                self.child.wait()  # the next call then starts another
                pytest.fail(f"{call} took more than {timeout} s under the interpreter")
            if line is None:
                pytest.fail(f"the interpreter's process exited during {call}:\n" + "".join(output)[-3000:])
            if line.startswith(self.MARK):
                break
            output.append(line)
        status, value = line[len(self.MARK):].split(" ", 1)
        if status == "error":
            pytest.fail(eval(value)[-3000:], pytrace=False)
        return eval(value)


_interpreter = None


def interpreted(call):
    """Evaluate `call` (an expression over this module, `t`) in the module's Python with Triton's interpreter
    on (started at the first call, again if it exited)."""
    global _interpreter
    if _interpreter is None or _interpreter.child.poll() is not None:
        _interpreter = Interpreter()
    return _interpreter(call)


@pytest.fixture(scope="module", autouse=True)
def _close_interpreter():
    yield
    if _interpreter is not None and _interpreter.child.poll() is None:
        _interpreter.child.stdin.close()  # its loop ends at the end of its input
        _interpreter.child.wait(timeout=60)


@pytest.mark.parametrize("H,W,lora_rank", CASES)
def test_kernels_match_stock_under_the_interpreter(H, W, lora_rank):
    assert max(interpreted(f"t.errors({H}, {W}, {lora_rank}, 'cpu', torch.float32)[0]")) < TOL


@pytest.mark.parametrize("H,W", [(8, 16), (14, 14)])  # row kernels, window kernels
def test_kernels_match_stock_with_frozen_tables_under_the_interpreter(H, W):
    """As our methods train: the tables frozen, so no table gradient is computed (only q's part through the
    rel-pos term, which the dq kernels add themselves)."""
    errs = interpreted(f"t.errors({H}, {W}, 4, 'cpu', torch.float32, frozen_tables=True)[0]")
    assert len(errs) == 10 and max(errs) < TOL, errs  # output, input, qkv (2), LoRA (4), proj (2)


# (grid, window): windows crossing the grid's edge (10 x 10 in 4 x 4: stock pads it to 12 x 12), rows != columns
# (6 x 9), a grid of whole windows (8 x 8: no padding), ViT's 14 x 14 window on a 16 x 16 grid (the one-kernel
# backward, 196 queries in a tile of 256), and 18 x 18 windows (324 tokens: the split backward kernels)
UNPADDED = [((10, 10), 4), ((6, 9), 4), ((8, 8), 4), ((16, 16), 14), ((20, 20), 18)]


def test_windowed_block_without_padding_matches_stock_under_the_interpreter():
    """fast.forwards.vit_window_attention: qkv and proj on the grid's tokens only, the padding keys' k and v from the
    qkv bias, the padding queries skipped; the same output and gradients (qkv bias and tables included) as
    stock SAM's padded windows, and stock's window_partition never runs."""
    results = interpreted("[t.windowed_block_errors(grid, window, 'lora') for grid, window in t.UNPADDED]")
    for (grid, window), (errs, partitions) in zip(UNPADDED, results):
        assert len(errs) == 20 and max(errs) < TOL and partitions == 0, (grid, window, errs, partitions)


def test_windowed_block_of_an_adapter_that_mixes_tokens_keeps_the_padding_under_the_interpreter():
    """AtrousLoRA's qkv is not tokenwise (its convolutions give padding tokens an update): the block takes
    stock's padded windows, through the window kernels, and matches stock."""
    errs, partitions = interpreted("t.windowed_block_errors((10, 10), 4, 'atrous')")
    assert max(errs) < TOL and partitions == 1, (errs, partitions)


def test_windows_take_the_split_kernels_where_the_one_kernel_backward_does_not_fit_under_the_interpreter():
    """A GPU with less shared memory than the one-kernel window backward needs (an A100, a 24 GB Ampere or
    Ada card) gets the same gradients from the split kernels, and later calls go straight to them."""
    errs, noted = interpreted("t.errors_where_the_whole_window_does_not_fit(14, 14)")
    assert max(errs) < TOL, errs
    assert noted == ["(device(type='cpu'), torch.float32)"], noted


@pytest.mark.parametrize("H,W", [(8, 16), (14, 14)])  # row kernels, window kernels
def test_kernels_take_qkv_as_the_projection_writes_it_under_the_interpreter(H, W):
    """The op takes qkv (B, N, 3, heads, D) and its backward writes qkv's gradient in that layout: no q, k, v
    split (unbind, permute) in the graph, whose backward stacked three gradients in a pass of its own."""
    nodes = interpreted(f"t.backward_nodes({H}, {W})")
    assert any("relpos_attention" in n for n in nodes), nodes
    assert not any(n.startswith(("Unbind", "Stack", "Permute")) for n in nodes), nodes


def fake_checks():
    """torch.library.opcheck's fake-tensor test of the forward and backward ops (the shapes, dtypes and strides
    that compiled graphs plan with, against what the kernels return) on a global grid (the row kernels, whose
    rel_h and rel_w are laid out transposed) and on windows crossing the grid's edge with the padding's
    gradient (window_attention)."""
    from fast import relpos_attention as ra
    results = []
    for rows, cols, grid in ((16, 16, (0, 0)), (4, 4, (10, 10))):
        qkv = torch.randn(1, (grid[0] * grid[1]) or rows * cols, 3, 2, 16)
        tables = torch.randn(2 * rows - 1, 16), torch.randn(2 * cols - 1, 16)
        pad_kv = torch.randn(2, 2, 16) if grid[0] else None
        args = (qkv, *tables, 0.25, *grid, pad_kv)
        out, lse, rel_h, rel_w = ra._relpos_attention(*args)
        backward_args = (torch.randn_like(out), qkv, *tables, rel_h, rel_w, out, lse, 0.25, *grid, pad_kv,
                         pad_kv is not None)
        for op, op_args in ((ra._relpos_attention, args), (ra._relpos_attention_backward, backward_args)):
            results.append(torch.library.opcheck(op, op_args, test_utils=("test_faketensor",))["test_faketensor"])
    return results


def test_ops_fake_registrations_match_the_kernels_under_the_interpreter():
    assert interpreted("t.fake_checks()") == ["SUCCESS"] * 4


def test_checkpointing_keeps_the_kernels_output_under_the_interpreter():
    difference, calls = interpreted("t.checkpointed('cpu')")
    assert difference < 1e-6 and calls == [1, 1], (difference, calls)


def test_checkpointing_recomputes_window_attention_under_the_interpreter():
    """Windowed blocks' attention is recomputed (its output, kept, would cost 60 MB per ViT-B block at
    batch 8), and the window kernels give the same gradients with and without checkpointing."""
    difference, calls = interpreted("t.checkpointed('cpu', window=6)")
    assert difference < 1e-6 and calls == [1, 2], (difference, calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need CUDA")
@pytest.mark.parametrize("H,W,lora_rank", CASES + [(64, 64, 4)])  # and ViT-B's global grid at 1024
def test_kernels_match_stock_on_cuda(H, W, lora_rank):
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32, _ = errors(H, W, lora_rank, torch.device("cuda"), torch.float32)
    assert max(fp32) < 1e-4, fp32  # fp32 products ("ieee"); the order of the sums differs from stock
    bf16, folded = errors(H, W, lora_rank, torch.device("cuda"), torch.bfloat16)
    # bf16: no further from fp32 stock than the folded SDPA form in bf16 is (with some slack), and small
    assert all(b <= 2 * f + 1e-3 for b, f in zip(bf16, folded)), (bf16, folded)
    assert max(bf16) < 5e-2, bf16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need CUDA")
@pytest.mark.parametrize("grid,window", [((64, 64), 14), ((20, 20), 18)])  # ViT-B's windowed blocks at 1024
def test_windowed_block_without_padding_matches_stock_on_cuda(grid, window):
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32, partitions = windowed_block_errors(grid, window, "lora", torch.float32, "cuda")
    assert max(fp32) < 1e-4 and partitions == 0, (fp32, partitions)
    # bf16: no further from fp32 stock than stock in bf16 is (with some slack; its gradients sum thousands of
    # tokens in bf16), as test_kernels_match_stock_on_cuda
    bf16, partitions, stock_bf16 = windowed_block_errors(grid, window, "lora", torch.bfloat16, "cuda")
    assert all(b <= 2 * s + 1e-3 for b, s in zip(bf16, stock_bf16)) and partitions == 0, (bf16, stock_bf16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need CUDA")
def test_checkpointing_keeps_the_kernels_output_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    difference, calls = checkpointed("cuda")
    assert difference < 1e-5 and calls == [1, 1], (difference, calls)


def test_shapes_the_kernels_do_not_take_go_the_folded_way():
    from types import SimpleNamespace
    from fast import relpos_attention

    def query(n, width, cuda=True):
        return SimpleNamespace(is_cuda=cuda, shape=(1, n, 3, 1, width), dtype=torch.bfloat16,  # qkv
                               device=torch.device("cuda" if cuda else "cpu"))
    assert relpos_attention.usable(query(64 * 64, 64), 64, 64)  # ViT-B/L global blocks at 1024
    assert relpos_attention.usable(query(14 * 14, 64), 14, 14)  # their windows (the window kernels)
    assert not relpos_attention.usable(query(70 * 70, 64), 70, 70)  # wider than the window kernels' 64
    assert not relpos_attention.usable(query(64 * 64, 80), 64, 64)  # ViT-H: heads 80 wide
    assert not relpos_attention.usable(query(64 * 64, 64, cuda=False), 64, 64)  # CPU, not interpreted
    if not torch.cuda.is_available():  # a CPU run does not even import Triton for the fast forwards
        assert forwards.relpos_kernels() is None


@pytest.mark.parametrize("method,windows", [("lora", [(2, 4, 4, 32, (8, 8))]),  # tokenwise: over the grid
                                            ("atrous_lora", [(2, 4, 4, 32, None)])])  # not: padded windows
def test_compile_ahead_precompiles_every_attention_shape(monkeypatch, method, windows):
    """fast.step.compile_ahead asks relpos_attention.precompile (which starts one child per shape) for each
    shape the kernels take: the tiny ViT's 4 x 4 windows, over its 8 x 8 grid where the block's qkv is
    tokenwise (fast.forwards.vit_block) or alone where it is not (the padded windows of AtrousLoRA), and its
    8 x 8 global grid (heads 32 wide; all for the window kernels)."""
    from types import SimpleNamespace
    from fast import relpos_attention
    from fast.step import compile_ahead
    _, model = method_model(method)  # the fast forwards, as fast.apply leaves them
    calls = []
    monkeypatch.setattr(forwards, "_RELPOS", SimpleNamespace(usable_shape=relpos_attention.usable_shape,
                                                             precompile=lambda *shape, grid=None: calls.append((*shape, grid))))
    for attn, _ in forwards.vit_attentions(model.image_encoder):
        attn.fast_relpos = True  # as on CUDA
    compile_ahead(model, compiling=False)
    assert sorted(set(calls), key=str) == sorted(windows + [(2, 8, 8, 32, None)], key=str), calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need CUDA")
def test_precompiled_kernels_are_what_a_vit_b_block_launches(tmp_path, monkeypatch):
    """relpos_attention.precompile's child fills Triton's cache with exactly the kernels that a ViT-B global
    block's attention (bf16 autocast, batch 2, forward and backward) then launches: a fresh process running
    that block adds nothing to the cache, so it compiled nothing."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernels = forwards.relpos_kernels()
    kernels._PRECOMPILING.clear()
    child = kernels.precompile(12, 64, 64, 64)
    assert child.wait(timeout=300) == 0
    filled = set(os.listdir(tmp_path))
    assert filled
    block = """
import torch, torch.nn as nn
from fast.forwards import use_fast_forwards
from segment_anything.modeling.image_encoder import Attention
attn = Attention(768, num_heads=12, qkv_bias=True, use_rel_pos=True, input_size=(64, 64)).cuda()
blk, encoder, model = nn.Module(), nn.Module(), nn.Module()
blk.attn = attn
encoder.blocks = nn.ModuleList([blk])  # as a ViT's blocks[i].attn
model.image_encoder = encoder
use_fast_forwards(model)
assert attn.fast_relpos
x = torch.randn(2, 64, 64, 768, device="cuda", requires_grad=True)
with torch.autocast("cuda", dtype=torch.bfloat16):
    y = attn(x)
y.float().sum().backward()
torch.cuda.synchronize()
"""
    subprocess.run([sys.executable, "-c", block], cwd=Path(common.__file__).parent, check=True, timeout=300,
                   env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(common.__file__).parent), *sys.path])))
    assert set(os.listdir(tmp_path)) == filled
