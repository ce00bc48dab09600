"""diffusekit.diffusion"""
