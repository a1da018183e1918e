# The demo job (`make demo`): SMCA single-scale trained from scratch on the CPU on the generated
# shapes dataset (datasets/prepare_synthetic.py: 4000 training images), then evaluated with
# COCOEvaluator.
# The small R18 model of configs/common/r18_synthetic.py, changed for the demo's fixed budget of
# about 11-13 minutes of training on 2 cores (each change measured, see README "Demo"):
# * res3 features (stride 8) instead of res4 (stride 16): the objects are 12..60 px in ~128 px
#   images, and an 8x8 map is too coarse to place the small ones;
# * no encoder layer (the backbone features go straight to the SMCA decoder, whose modulated
#   co-attention is what SMCA adds) and lr 4e-4 instead of 2e-4: faster learning from scratch,
#   and 0.19 s per iteration instead of 0.24 with one encoder layer;
# * no dropout: it slows down learning in a run this short, and costs time;
# * the backbone in channels-last memory format (faster convolutions on the CPU);
# * batches of images of one size (rounded up to 16 px): the flips keep image sizes, so a batch
#   is padded much less than with the aspect-ratio grouping.
from ..common.r18_synthetic import dataloader, model, optimizer, train
from ..common.schedule import step_schedule

model.backbone.out_features = ["res3"]
model.in_features = ["res3"]
model.transformer.encoder.num_layers = 0
model.transformer.decoder.dropout = 0.0
train.speedups.channels_last = True
model.size_divisibility = 16

dataloader.train.size_grouping = 16

optimizer.lr = 4e-4

train.max_iter = 3600
train.eval_period = train.max_iter
train.checkpointer.period = 500
train.output_dir = "output/demo_smca_r18_synthetic"
lr_multiplier = step_schedule(train.max_iter)
