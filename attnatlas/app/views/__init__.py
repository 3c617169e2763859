"""The dashboard's views, one module each, behind `base.View`; `registry` lists them in tab order.

grid (All heads, with head_map and head_scatter), head (Single head), compare, vit (the ViT analyses),
model_math (Model & head math), and live ("Your text", which joins the head view and the grid).
"""
