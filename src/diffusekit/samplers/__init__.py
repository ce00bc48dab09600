"""diffusekit.samplers"""
