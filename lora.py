"""LoRA on SAM's image encoder, prompt-free: the SAMed recipe.

Paper: Zhang & Liu, "Customized Segment Anything Model for Medical Image Segmentation" (SAMed),
arXiv 2304.13785; code github.com/hitachinsk/SAMed. Low-rank adaptation itself: Hu et al., arXiv 2106.09685.

What the method does, in the order of this file:
1. Freeze SAM. In every image-encoder attention, the frozen `qkv` projection gets two low-rank paths,
   one added to the query and one to the value output (the key is left alone, as SAMed does):
       q = W_q x + B_q A_q x,   v = W_v x + B_v A_v x,   A: d -> r,  B: r -> d,  r = --rank (4).
   A is Kaiming-initialised and B is zero, so at step 0 the model is exactly stock SAM.
2. Train the mask decoder too (SAMed trains it, and its mask tokens are re-purposed as one per class:
   background + each foreground class, scored by a softmax).
3. No prompts: the prompt encoder's "no mask" embedding is the only prompt the decoder ever sees.
Loss 0.2 CE + 0.8 Dice, AdamW, linear warm-up then polynomial decay, as SAMed (changes in common.py).

Run:  python lora.py --data drive --data-root ../shared/data/DRIVE --split salt
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from data import UserError, load_data


def parse_args(argv=None):
    p = common.base_parser("LoRA (SAMed) on SAM's image encoder, prompt-free.")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r of the q and v updates (SAMed: 4)")
    return p.parse_args(argv)


class LoRAQKV(nn.Linear):
    """A frozen qkv projection plus trainable low-rank updates of its q and v outputs.

    Subclasses nn.Linear and keeps the frozen weight under the same name, so `...attn.qkv.weight` still
    loads from a SAM checkpoint. `heads=None`: output laid out [q | k | v] (SAM's ViT); `heads=h`: laid out
    per head [q_1 k_1 v_1 | q_2 k_2 v_2 | ...] (MobileSAM's TinyViT)."""
    # each token's output depends on that token alone, and a zero token gives the bias: windowed ViT blocks
    # need not pad their windows (common.tokenwise)
    tokenwise = True

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
        # A_q x and A_v x as one product with [A_q; A_v]: x is read once, and the backward writes one
        # gradient for it (ViT-B LoRA step on the H100: 86.8 -> 85.6 ms)
        down = F.linear(x, torch.cat([self.lora_A_q.weight, self.lora_A_v.weight]))  # (..., 2r)
        # W x + b + [B_q A_q x | 0 | B_v A_v x] (TinyViT: per-head order), (..., 3*width); see
        # linear_with_qv_update for how
        return common.linear_with_qv_update(x, self.weight, self.bias, down, self.lora_B_q.weight,
                                            self.lora_B_v.weight, self.heads)

    def merged_weight(self):
        """W + ΔW as one (3*width, d_in) matrix: the update folded into the frozen weight."""
        dq = self.lora_B_q.weight @ self.lora_A_q.weight  # (width, d_in)
        dv = self.lora_B_v.weight @ self.lora_A_v.weight
        return self.weight + common.place_qv(dq.T, dv.T, self.heads).T


def inject(model, rank):
    """Wrap every encoder attention's qkv; train the LoRA paths and the mask decoder."""
    for attn, heads in common.encoder_attentions(model.image_encoder):
        limit = min(attn.qkv.in_features, attn.qkv.out_features // 3)
        if not 0 < rank <= limit:
            raise UserError(f"--rank {rank} does not fit: it must be between 1 and {limit} for this model.")
        attn.qkv = LoRAQKV(attn.qkv, rank, heads)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    common.train_decoder(model)


def lora_parameter_count(model, rank):
    """The formula the tests check: per attention, two paths of r·(d_in + width)."""
    return sum(2 * rank * (attn.qkv.in_features + attn.qkv.out_features // 3)
               for attn, _ in common.encoder_attentions(model.image_encoder))


def merged_state_dict(model):
    """SAM's own state dict with every LoRA update folded into its qkv weight (for --export-merged)."""
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoRAQKV):
            state[f"{name}.weight"] = module.merged_weight()
    return state


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args, "lora", gpu_steps=1000)
    model = common.load_sam(args, device)
    inject(model, args.rank)
    model.to(device)
    if common.predict_or_export(model, args, device, merged_state_dict):
        return None
    train_set, test_set = load_data(args, device)
    return common.run(model, train_set, test_set, args, device, cuda_graph=True)  # default_loss: capturable


if __name__ == "__main__":
    common.main_guard(main)
