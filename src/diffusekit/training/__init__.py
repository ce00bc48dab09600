"""diffusekit.training"""
