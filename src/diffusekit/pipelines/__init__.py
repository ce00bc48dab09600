"""diffusekit.pipelines"""
