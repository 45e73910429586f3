"""The copy test: each method file's adapter section (from its "# The adapter (needs only torch and
segment_anything ..." line to the end of `inject`, for samora.py to the end of `set_stage`, as the comment
says) is all another project needs to use the adapter. Its source alone is executed, in a namespace holding
only torch, nn, F, math and segment_anything (not the method's module, not common.py, not the fast layer),
and its `inject` adapts a plain segment_anything Sam built from SAM's own classes: at step 0 the prompt-free
outputs are stock SAM's, and one AdamW step changes only what inject marked trainable."""
import ast
import builtins
import copy
import math
import types
from pathlib import Path

import pytest
import segment_anything
import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention

import common

ROOT = Path(__file__).resolve().parents[1]
MARK = "# The adapter (needs only torch and segment_anything"
SECTION_END = dict(lora="inject", atrous_lora="inject", salt="inject", balr_sam="inject", samora="set_stage")
ADAPTER_NAMES = ("lora_", "salt_", "samora_hl", "cden.", "lowrank_")  # the parameters only an adapter has
SALT_ARGS = types.SimpleNamespace(rank=4, top_attn=0.99, top_mlp=0.065, top_neck=0.977, relu="sigma", s_sam=False)
INJECT = {  # the section's inject, called as another project would
    "lora": lambda ns, sam: ns["inject"](sam, 4),
    "atrous_lora": lambda ns, sam: ns["inject"](sam, 4, (1, 2, 3)),
    "salt": lambda ns, sam: ns["inject"](sam, SALT_ARGS),
    # full decoder rank (clipped to each projection's): the factorised decoder is the dense one up to rounding
    "balr_sam": lambda ns, sam: ns["inject"](sam, 4, 10 ** 6, 32),
    "samora": lambda ns, sam: ns["inject"](sam, 4, 32, 4),
}


def section(method):
    """The adapter section's source: from the line starting with MARK to the last line of the function
    SECTION_END[method] (its end found by ast)."""
    source = (ROOT / f"{method}.py").read_text()
    lines = source.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(MARK)]
    assert len(starts) == 1, f"{method}.py: no single line starting with {MARK!r}"
    end = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == SECTION_END[method]]
    assert len(end) == 1 and end[0].lineno > starts[0], f"{method}.py: no {SECTION_END[method]} after the mark"
    return "".join(lines[starts[0]:end[0].end_lineno])


def namespace():
    """What the section may use: torch and segment_anything, under the names the method files give them.
    `Attention` is segment_anything's mask-decoder attention (segment_anything.modeling.transformer), kept
    in the namespace for a section that imports it at module level."""
    return dict(torch=torch, nn=nn, F=F, math=math, segment_anything=segment_anything, Attention=Attention)


def free_names(source):
    """Names the source reads that it neither defines, imports nor gets from builtins."""
    tree = ast.parse(source)
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            defined.add(node.id)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return read - defined - set(dir(builtins))


def stock_sam(seed=0):
    """A small randomly initialised SAM of segment_anything's own classes: the tiny ViT of
    common.VIT_CONFIGS at 128 (2 blocks, one windowed, one global), its prompt encoder and mask decoder."""
    torch.manual_seed(seed)
    image_encoder, prompt_encoder, mask_decoder = common.build_sam_parts("tiny", 128, 1)
    sam = Sam(image_encoder, prompt_encoder, mask_decoder)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # SAM starts its rel-pos tables at zero, which would hide a path that dropped them
        for name, p in sam.named_parameters():
            if "rel_pos" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return sam.eval()


def prompt_free(sam, x):
    """Image embedding and masks without prompts: predict_masks on the prompt encoder's no-prompt output."""
    emb = sam.image_encoder(x)
    masks, _ = sam.mask_decoder.predict_masks(emb, sam.prompt_encoder.get_dense_pe(), *sam.prompt_encoder(None, None, None))
    return emb, masks


@pytest.mark.parametrize("method", list(SECTION_END))
def test_adapter_section_alone_adapts_a_plain_segment_anything_sam(method):
    source = section(method)
    missing = free_names(source) - set(namespace())
    assert not missing, f"{method}.py's adapter section needs {sorted(missing)} from outside it"
    ns = namespace()
    exec(compile(source, f"<{method}.py adapter section>", "exec"), ns)
    modules = {k for k, v in ns.items() if isinstance(v, types.ModuleType)}
    assert modules <= {"torch", "nn", "F", "math", "segment_anything"}, modules  # no method module, no common

    stock = stock_sam()
    sam = copy.deepcopy(stock)
    INJECT[method](ns, sam)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))

    # (a) at step 0 the adapted SAM gives stock SAM's embedding and masks (bit for bit where the adapter's
    # update is exactly zero; balr_sam at r >= the token grid pools nothing, and its exact image -> token
    # form equals stock attention up to rounding)
    with torch.no_grad():
        want, got = prompt_free(stock, x), prompt_free(sam, x)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        if method == "balr_sam":
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
        else:
            assert torch.equal(a, b), (a - b).abs().max()

    # (b) one AdamW step on a loss of those outputs changes only what inject marked trainable
    names = dict(sam.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}
    adapter = {n for n in names if any(key in n for key in ADAPTER_NAMES)}
    assert adapter and adapter <= trainable, sorted(adapter - trainable)
    assert not any(n.startswith("image_encoder.") and n not in adapter and "norm" not in n for n in trainable)
    if method == "samora":  # three experts, each with its own q and v paths, in every encoder attention
        for e in ("image", "patch", "pixel"):
            for part in ("A_q", "B_q", "A_v", "B_v"):
                assert sum(f".samora_{e}_{part}." in n for n in names) == len(sam.image_encoder.blocks), (e, part)
    before = {n: p.detach().clone() for n, p in names.items()}
    optimizer = torch.optim.AdamW(sam.parameters(), lr=1e-2)
    sam.train()
    emb, masks = prompt_free(sam, x)
    (emb.square().mean() + (masks - 1).square().mean()).backward()
    optimizer.step()
    changed = {n for n, p in names.items() if not torch.equal(p, before[n])}
    assert changed <= trainable, sorted(changed - trainable)
    assert changed & adapter, "the step moved no adapter parameter"
    for n, p in names.items():
        if n not in trainable:
            assert p.grad is None and torch.equal(p, before[n]), n  # frozen: bit-identical, no gradient
    stock_buffers = dict(stock.named_buffers())
    for n, b in sam.named_buffers():
        if n in stock_buffers:  # SAM's own buffers are untouched
            assert torch.equal(b, stock_buffers[n]), n
