"""diffusekit.cli"""
