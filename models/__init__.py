"""flaxlab models: pure Flax (linen) modules; they never import train or configs."""
