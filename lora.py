"""LoRA on SAM's image encoder, prompt-free: the SAMed recipe.

Paper: Zhang & Liu, "Customized Segment Anything Model for Medical Image Segmentation" (SAMed),
arXiv 2304.13785; code github.com/hitachinsk/SAMed. Low-rank adaptation itself: Hu et al., arXiv 2106.09685.

What the method does, in the order of this file:
1. Freeze SAM. In every image-encoder attention, the frozen `qkv` projection gets two low-rank paths,
   one added to the query and one to the value output (the key is left alone, as SAMed does):
       q = W_q x + B_q A_q x,   v = W_v x + B_v A_v x,   A: d -> r,  B: r -> d,  r = --rank (4; several classes: 32).
   A is Kaiming-initialised and B is zero, so at step 0 the model is exactly stock SAM.
2. Train the mask decoder too (SAMed trains it, and its mask tokens are re-purposed as one per class:
   background + each foreground class, scored by a softmax).
3. No prompts: the prompt encoder's "no mask" embedding is the only prompt the decoder ever sees.

Differences from SAMed's recipe (its train.py and trainer.py defaults and the README's command; the loop
every method shares is common.py's):
  what           SAMed                                          this file
  loss           0.2 CE + 0.8 Dice on the 4x smaller logits     0.2 CE + 0.8 Dice on logits upsampled to the label's
                 (128 x 128 at 512); Dice over background and   full size; Dice over the foreground classes only,
                 classes, squared denominators, smooth 1e-5     plain denominators, smooth 1
  optimiser      AdamW, betas (0.9, 0.999)                      the same
  learning rate  5e-3                                           1e-3 (--lr; several classes: 3e-3)
  weight decay   0.1                                            0.01 (--weight-decay)
  warm-up        250 steps, linear                              50 steps, linear (--warmup; at most a tenth of --steps)
  schedule       poly 0.9 over 200 epochs, stopped at epoch     poly 0.9, reaching 0 at the last step
                 160 (the rate ends near a quarter of its peak)
  batch          24 (12 on each of 2 GPUs)                      8 on a GPU, 2 on a CPU (--batch-size)
  length         160 epochs of 2,211 Synapse slices (about      1000 steps on a GPU (--steps)
                 15,000 steps)
  input          ViT-B at 512 (slices stored at 224,            MobileSAM's TinyViT at 1024 (--model, --img-size);
                 upsampled), in [0, 1] without mean/std         SAM's mean/std; crops of 1/zoom of the image
                                                                (--zoom; DRIVE: 2)
  prompts        none (the no-mask embedding)                   the same
  what trains    q/v LoRA (r 4, all blocks), mask decoder,      q/v LoRA in every encoder attention (--rank 4;
                 prompt encoder (of which only the no-mask      several classes: 32), mask decoder (spare tokens'
                 embedding gets a gradient); mask tokens,       hypernetworks frozen), the no-mask embedding; all
                 hypernetworks and IoU head re-initialised      of the decoder pretrained, none re-initialised
  augmentation   rot90 + flip, or rotation +-20 deg             flip, rotation +-10 deg, brightness (SALT's)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli


def parse_args(argv=None):
    p = cli.base_parser("LoRA (SAMed) on SAM's image encoder, prompt-free.")
    p.add_argument("--rank", type=int, default=None,
                   help="LoRA rank r of the q and v updates (default: 4, SAMed's; with several classes 32)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# The adapter (needs only torch and segment_anything: copy it from here to the end of inject)
# ----------------------------------------------------------------------------------------------------

def encoder_attentions(image_encoder):
    """(attention, heads) of every image-encoder attention. SAM's ViT: its qkv output is [q | k | v] over
    tokens (B, H, W, C) (heads None). MobileSAM's TinyViT: its qkv output is per head [q_h | k_h | v_h] over
    flat window tokens (B*nW, ws*ws, C), so the head count is needed to place q and v."""
    if hasattr(image_encoder, "blocks"):
        return [(blk.attn, None) for blk in image_encoder.blocks]
    return [(blk.attn, blk.attn.num_heads) for layer in image_encoder.layers[1:] for blk in layer.blocks]


def qv_update(dq, dv, heads):
    """[dq | 0 | dv] (..., 3*width) laid out as the qkv output keeps q, k and v: whole (heads None) or per
    head [dq_h | 0 | dv_h] (TinyViT)."""
    dk = torch.zeros_like(dq)
    if heads is None:
        return torch.cat([dq, dk, dv], -1)
    return torch.stack([t.unflatten(-1, (heads, -1)) for t in (dq, dk, dv)], -2).flatten(-3)


class LoRAQKV(nn.Linear):
    """A frozen qkv projection plus trainable low-rank updates of its q and v outputs.

    Subclasses nn.Linear and keeps the frozen weight under the same name, so `...attn.qkv.weight` still
    loads from a SAM checkpoint."""

    def __init__(self, qkv: nn.Linear, rank: int, heads=None):
        super().__init__(qkv.in_features, qkv.out_features, bias=qkv.bias is not None, device="meta")
        self.weight, self.bias = qkv.weight, qkv.bias  # the frozen pretrained projection, shared not copied
        self.heads = heads
        d_in, width = qkv.in_features, qkv.out_features // 3  # width of q (= k = v) over all heads
        self.lora_A_q = nn.Linear(d_in, rank, bias=False, device=qkv.weight.device)
        self.lora_B_q = nn.Linear(rank, width, bias=False, device=qkv.weight.device)
        self.lora_A_v = nn.Linear(d_in, rank, bias=False, device=qkv.weight.device)
        self.lora_B_v = nn.Linear(rank, width, bias=False, device=qkv.weight.device)
        for a, b in ((self.lora_A_q, self.lora_B_q), (self.lora_A_v, self.lora_B_v)):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # as nn.Linear and SAMed
            nn.init.zeros_(b.weight)  # B = 0: the update starts at zero, the model starts as stock SAM

    def forward(self, x):
        # x: (B, H, W, d) for ViT (windowed: (B*nW, 14, 14, d)); (B*nW, ws*ws, d) for TinyViT
        dq = self.lora_B_q(self.lora_A_q(x))  # B_q A_q x, (..., width)
        dv = self.lora_B_v(self.lora_A_v(x))  # B_v A_v x
        return F.linear(x, self.weight, self.bias) + qv_update(dq, dv, self.heads)  # W x + b + [dq | 0 | dv]

    def merged_weight(self):
        """W + [B_q A_q; 0; B_v A_v] as one (3*width, d_in) matrix: the update folded into the frozen weight."""
        dq = self.lora_B_q.weight @ self.lora_A_q.weight  # (width, d_in)
        dv = self.lora_B_v.weight @ self.lora_A_v.weight
        return self.weight + qv_update(dq.T, dv.T, self.heads).T


def inject(sam, rank):
    """Wrap every encoder attention's qkv of `sam` (any module holding SAM's image_encoder, prompt_encoder
    and mask_decoder); train the LoRA paths, the mask decoder and the no-mask embedding (SAMed)."""
    for attn, heads in encoder_attentions(sam.image_encoder):
        limit = min(attn.qkv.in_features, attn.qkv.out_features // 3)
        if not 0 < rank <= limit:
            raise ValueError(f"--rank {rank} does not fit: it must be between 1 and {limit} for this model.")
        attn.qkv = LoRAQKV(attn.qkv, rank, heads)
    for name, p in sam.named_parameters():
        p.requires_grad = "lora_" in name
    sam.mask_decoder.requires_grad_(True)
    sam.prompt_encoder.no_mask_embed.requires_grad_(True)  # the only prompt embedding used without prompts


# ----------------------------------------------------------------------------------------------------
# Using it
# ----------------------------------------------------------------------------------------------------

def lora_parameter_count(model, rank):
    """The formula the tests check: per attention, two paths of r·(d_in + width)."""
    return sum(2 * rank * (attn.qkv.in_features + attn.qkv.out_features // 3)
               for attn, _ in encoder_attentions(model.image_encoder))


def merged_state_dict(model):
    """SAM's own state dict with every LoRA update folded into its qkv weight (for --export-merged)."""
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoRAQKV):
            state[f"{name}.weight"] = module.merged_weight()
    return state


def main(argv=None):
    args = parse_args(argv)
    return cli.main(args, "lora", inject=lambda model: inject(model, args.rank), merge=merged_state_dict)


if __name__ == "__main__":
    cli.main_guard(main)
