# The demo job (`make demo`): SMCA single-scale trained from scratch on the CPU on the generated
# shapes dataset (datasets/prepare_synthetic.py), then evaluated with COCOEvaluator.
# The small R18 model of configs/common/r18_synthetic.py, changed for the demo's fixed budget of
# about 11 minutes of training on 2 cores (each change measured, see README "Demo"):
# * res3 features (stride 8) instead of res4 (stride 16): the objects are 12..60 px in ~128 px
#   images, and an 8x8 map is too coarse to place the small ones;
# * no dropout: it slows down learning in a run this short, and costs time;
# * the backbone in channels-last memory format (faster convolutions on the CPU).
from ..common.r18_synthetic import dataloader, model, optimizer, train
from ..common.schedule import step_schedule

model.backbone.out_features = ["res3"]
model.in_features = ["res3"]
model.transformer.decoder.dropout = 0.0
model.channels_last = True

train.max_iter = 1800
train.eval_period = train.max_iter
train.checkpointer.period = 500
train.output_dir = "output/demo_smca_r18_synthetic"
lr_multiplier = step_schedule(train.max_iter)
