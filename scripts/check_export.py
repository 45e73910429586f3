"""Export -> stock MobileSAM -> DRIVE Dice: the merged weights, loaded into mobile_sam's own registry model
(its own classes, strict loading), must give the adapter model's Dice.
usage: check_export.py LORA_CHECKPOINT DRIVE_ROOT [OUT.json]"""
import json
import sys

import torch

sys.path.insert(0, ".")
import common
import lora
from data import load_data

ckpt, drive = sys.argv[1], sys.argv[2]
lora.main(["--data", "drive", "--data-root", drive, "--resume", ckpt, "--export-merged", "/tmp/merged.pth"])
args = lora.parse_args(["--data", "drive", "--data-root", drive, "--eval-only", "--resume", ckpt])
device = common.setup(args, "lora", 1000)
model = common.load_sam(args, device)
lora.inject(model, args.rank)
common.load_checkpoint(ckpt, model.to(device), args)
_, test = load_data(args, device)
ours = common.evaluate(model, test, 8)[0]

from mobile_sam import sam_model_registry  # stock code: nothing of this repository inside the model
stock = sam_model_registry["vit_t"]()
stock.load_state_dict(torch.load("/tmp/merged.pth", weights_only=True), strict=True)
stock.to(device).eval()


def stock_forward(images):  # the prompt-free call written against the stock API only
    emb = stock.image_encoder((images.float() * 255 - stock.pixel_mean) / stock.pixel_std)
    sparse, dense = stock.prompt_encoder(None, None, None)
    masks, _ = stock.mask_decoder.predict_masks(emb, stock.prompt_encoder.get_dense_pe(), sparse, dense)
    return masks[:, :2]


wrapped = torch.nn.Module()
wrapped.forward = stock_forward
wrapped.img_size, wrapped.num_classes = 1024, 1
theirs = common.evaluate(wrapped, test, 8)[0]
print(f"adapter model: Dice {ours['dice']:.4f} HD95 {ours['hd95']:.2f}   "
      f"stock MobileSAM with merged weights: Dice {theirs['dice']:.4f} HD95 {theirs['hd95']:.2f}")
if len(sys.argv) > 3:
    with open(sys.argv[3], "w") as f:
        json.dump(dict(checkpoint=ckpt, adapter=ours, stock_merged=theirs, device=str(device)), f, indent=1)
