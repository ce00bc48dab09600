"""diffusekit.networks"""
