"""posttrain.eval"""
