"""diffusekit.evaluation"""
