"""Where does a training step's time go? Times eager vs compiled variants of the LoRA step and evaluation."""
import sys, time
import torch
sys.path.insert(0, ".")
import common, lora
from data import load_data

def timed(fn, n):
    torch.cuda.synchronize(); t = time.time()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.time() - t) / n

def build(variant, model_name="mobile_sam", bs=8):
    args = lora.parse_args(["--data", "drive", "--data-root", ".data/DRIVE", "--model", model_name, "--checkpoint", "none"])
    dev = common.setup(args, "lora", 1000)
    model = common.load_sam(args, dev); lora.inject(model, 4); model.to(dev)
    tr, te = load_data(args, dev)
    if variant == "blocks": common.compile_model(model)
    if variant == "encoder": model.image_encoder.compile(); model.mask_decoder.transformer.compile()
    if variant == "whole": model.compile()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    nb = common.labelled_batches(tr, bs, args.generator)
    def step():
        x, y = nb()
        with common.autocast(dev): loss = common.default_loss(model, x, y)
        opt.zero_grad(); loss.backward(); opt.step()
    return model, tr, te, step, nb

for model_name in sys.argv[1:] or ["mobile_sam"]:
    for variant in ["eager", "blocks", "encoder", "whole"]:
        model, tr, te, step, nb = build(variant, model_name)
        t = time.time(); step(); step(); torch.cuda.synchronize(); first = time.time() - t
        s = timed(step, 10)
        x, y = nb()
        fwd = timed(lambda: model(x), 10)
        ev = timed(lambda: common.evaluate(model, te, 8), 2)
        print(f"{model_name:10s} {variant:8s} first2 {first:6.1f}s  step {s*1000:7.1f} ms = {8/s:6.1f} img/s  fwd-only {fwd*1000:6.1f} ms  eval(6 img) {ev:5.2f}s  peak {torch.cuda.max_memory_allocated()/2**30:5.1f} GiB", flush=True)
        del model; torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        torch._dynamo.reset()
