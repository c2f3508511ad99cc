"""posttrain.train"""
