"""nnU-Net planning for nndiffseg: the planner (planner.py) and nnDiffSeg_plan_and_preprocess."""

PLANS_NAME = "nnDiffSegPlans"  # here, so that the tools can name it without importing nnU-Net's planner
